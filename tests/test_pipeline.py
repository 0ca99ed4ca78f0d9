"""The pipeline's shape: its modules deliver to the HTTP surface, and never reach back up into it."""

import ast

from tests.test_layout import MODULES, import_graph

# The one pipeline (issue 25): the request type, parsing, admission and delivery, production, storing and
# recording, idempotency around it, and the jobs it queues.
PIPELINE = (*(name for name in MODULES if name.startswith("qubax.pipeline.")), "qubax.background.jobs")
PIPELINE += ("qubax.background.runner",)
# What parses and renders HTTP: the routers, the key dependency, body reading, docs, the app itself.
HTTP_SURFACE = ("qubax.app", "qubax.api", "qubax.console")
RESPONSES = ("fastapi.responses", "starlette.responses")


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def surface(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in HTTP_SURFACE)


def test_no_module_of_the_pipeline_reaches_the_http_surface() -> None:
    graph = import_graph()
    assert set(PIPELINE) <= set(graph)
    found = {module: sorted(filter(surface, reached(graph, module))) for module in PIPELINE}
    assert not any(found.values()), {module: names for module, names in found.items() if names}


def test_the_pipeline_delivers_answers_and_the_routes_render_them() -> None:
    """No module of the pipeline builds an HTTP response: it hands `pipeline.Answer` up instead."""
    for module in PIPELINE:
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("fastapi", "starlette"):
                assert not {"Response", "responses"} & {alias.name for alias in node.names}, module
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(RESPONSES), module
