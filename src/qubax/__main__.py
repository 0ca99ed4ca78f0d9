from qubax.cli import main

main()
