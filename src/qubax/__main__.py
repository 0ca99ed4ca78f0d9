from qubax.server.cli import main

main()
