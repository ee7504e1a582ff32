"""The package as a whole: no import cycles (module-level or inside functions), modality chosen in one place,
a small public API at the top level."""
import ast
import re
from pathlib import Path

import influencerformer

PACKAGE = Path(influencerformer.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted name → file of every module of the package (a package is its __init__.py)."""
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def _imported(name: str, file: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The package modules one import statement reads (``from .x import y``: ``pkg.x.y`` when y is a module)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    result = []
    for target in targets:
        while target and target not in modules and "." in target:
            target = target.rpartition(".")[0]  # a name inside a module: the module
        if target in modules and target != name:
            result.append(target)
    return result


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body (functions, methods, TYPE_CHECKING too)."""
    modules = _modules()
    graph = {}
    for name, file in modules.items():
        nodes = [n for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {m for node in nodes for m in _imported(name, file, node, modules)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_function_level_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "influencerformer.engine.build" in graph["influencerformer.engine.train"]
    assert "influencerformer.losses.seeded" in graph["influencerformer.losses.registry"]  # imported in a function


def test_no_module_imports_a_module_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_modality_is_chosen_only_by_the_builder():
    """Outside engine/build.py (and the two modality modules it chooses between), nothing asks whether the data
    is images or point clouds."""
    asks = re.compile(r"is_point_data|POINT_DATASETS|IMAGE_DATASETS|MODALITY\[|\bin \(\"rooms3d\"|== \"rooms3d\"")
    allowed = {"engine/build.py", "engine/config.py", "engine/images.py", "engine/points.py"}
    found = [f"{path.relative_to(PACKAGE)}:{n}" for path in PACKAGE.rglob("*.py")
             if str(path.relative_to(PACKAGE)) not in allowed
             for n, line in enumerate(path.read_text().splitlines(), 1) if asks.search(line)]
    assert not found, found


def test_the_two_modalities_expose_the_same_interface():
    from influencerformer.engine import images, points
    from influencerformer.engine.build import MODALITIES

    interface = ["MODEL", "UNIT", "AP_LABEL", "AP_DOC", "MASKS_CAPTION", "PANEL", "build_dataset", "make_collate",
                 "make_evaluator", "predict", "draw", "truth", "item_name", "load_items", "describe_data",
                 "attach_terms"]
    assert set(MODALITIES.values()) == {images, points}
    for module in (images, points):
        assert [name for name in interface if not hasattr(module, name)] == [], module.__name__


def test_the_top_level_api_is_small_and_works():
    import torch

    import influencerformer as inf

    assert set(inf.__all__) == {
        "Config", "HungarianCriterion", "InfluencerLoss", "MaskFormer", "MaskFormerConfig", "MaskInfluencerCriterion",
        "PointModelConfig", "PointQueryModel", "SeededCriterion", "__version__", "build_criterion", "compare",
        "evaluate_checkpoint", "load_config", "train"}
    assert all(hasattr(inf, name) for name in inf.__all__)
    assert not hasattr(inf, "sinkhorn") and not hasattr(inf, "pairwise_dice")  # primitives stay in submodules
    criterion = inf.build_criterion("influencer", num_classes=3, num_points=None)
    assert isinstance(criterion, inf.MaskInfluencerCriterion)
    model = inf.MaskFormer(inf.MaskFormerConfig.preset("tiny", num_classes=3, num_queries=4))
    outputs = model(torch.rand(1, 3, 64, 64))
    targets = [{"labels": torch.tensor([1]), "masks": torch.zeros(1, 64, 64, dtype=torch.bool)}]
    assert torch.isfinite(criterion(outputs, targets)["loss"])
    cfg = inf.load_config(None, ["train.steps=5"])
    assert isinstance(cfg, inf.Config) and cfg.train.steps == 5
