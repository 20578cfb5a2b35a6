"""Shared fixtures and suite settings: GPU skips, a shuffled test order, warnings as errors."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # model_zoo, numerics helpers

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton decorates its own standard library (tl.zeros, ...) when triton is first imported, and
    # torch._dynamo imports triton; so its interpreter is switched on before any test imports
    # anything: without CUDA, the whole session runs Triton kernels interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Warnings of third-party code that the suite cannot fix, by message and module. pyproject's
# `filterwarnings` turns every other warning into an error; these are also added to each test as
# marks, which take precedence over a command line `-W error`, so both `pytest -W error` and
# `python -W error -m pytest` keep failing on our own warnings only.
THIRD_PARTY_WARNINGS = [
    # torch 2.13 deprecated its pytree LeafSpec class and warns whenever one is rebuilt — also by
    # copy.deepcopy of an exported GraphModule's input spec (sparsify/export.py copies the graph).
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
    # FA4 (flash-attn-4) and its CuTe DSL, on GPU machines: deprecations inside their own imports and
    # a compile-time note (the fa4 backend also silences both where it imports and compiles FA4).
    r"ignore:cutlass\.:DeprecationWarning",
    r"ignore:Argument aux_data:UserWarning",
    # CuTe DSL's own warpgroup module, also raised from FA4's kernels while they are built (H100).
    r"ignore:warpgroup\.OperandMajorMode is deprecated:DeprecationWarning",
    # Inductor imports torch.utils.mkldnn, whose ScriptModules use this deprecated torch.jit API
    # (torch 2.11 and later), whenever a test compiles with the Inductor backend.
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning:torch",
    # Inductor's CUDA-graph tree manager captures an intentionally empty graph once per process and
    # device (to keep its memory pool alive) inside `catch_warnings(record=True)`, which keeps the
    # suite's "error" filter: the first reduce-overhead compile of a run raised it (H100, torch 2.11).
    r"ignore:The CUDA Graph is empty:UserWarning:torch",
    # Inductor's once-per-process advice when it compiles a float32 matmul with TF32 off (a float32
    # model on an Ampere+ GPU); the suite keeps float32 exact on purpose.
    r"ignore:TensorFloat32 tensor cores for float32 matrix multiplication:UserWarning:torch",
]


def pytest_addoption(parser):
    parser.addoption("--random-order-seed", type=int, default=None,
                     help="seed of the shuffled test order (default: random, printed in the header; "
                          "or SPARSIFY_TEST_ORDER_SEED). Use 0 to keep the file order.")


def pytest_configure(config):
    seed = config.getoption("--random-order-seed")
    worker_input = getattr(config, "workerinput", None)   # a pytest-xdist worker: the controller's seed
    if worker_input is not None and "random_order_seed" in worker_input:
        seed = worker_input["random_order_seed"]
    elif seed is None:
        seed = int(os.environ.get("SPARSIFY_TEST_ORDER_SEED", random.SystemRandom().randrange(1, 2**31)))
    config.random_order_seed = seed


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    # pytest-xdist: every worker must collect the same order, so each one shuffles with the controller's seed.
    node.workerinput["random_order_seed"] = node.config.random_order_seed


def pytest_report_header(config):
    seed = config.random_order_seed
    return [f"test order: shuffled with --random-order-seed={seed}" if seed else "test order: as in the files"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Also under -q (which hides the header): the seed that replays this order.
    seed = config.random_order_seed
    if seed:
        terminalreporter.write_line(f"test order: shuffled with --random-order-seed={seed}")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        for ignore in reversed(THIRD_PARTY_WARNINGS):
            item.add_marker(pytest.mark.filterwarnings(ignore))
    seed = config.random_order_seed
    if not seed:
        return
    # Modules in a random order, tests in a random order within each module (module-scoped
    # fixtures are then built once per module, as in file order).
    shuffler = random.Random(seed)
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(modules.values())
    shuffler.shuffle(groups)
    for group in groups:
        shuffler.shuffle(group)
    items[:] = [item for group in groups for item in group]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
