"""Options shared by `tests/` and `suites/`: the device under test and the nightly matrix."""
import pytest
import torch

from reference_runner.device import DeviceUnavailable, detect_device, resolve_device

pytest_plugins = ("harness.bench.plugin",)  # baseline storage, machine info and ratio gate of suites/bench


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu, cuda or npu (default: detected)")
    parser.addoption("--nightly", action="store_true", help="also run the long matrix (tests marked slow)")


def pytest_configure(config):
    # The tiny models gain nothing from a second thread, and lose 50x when another process holds a core.
    torch.set_num_threads(1)
    try:
        name = config.getoption("--device")
        config.device = resolve_device(name) if name else detect_device()
    except DeviceUnavailable as error:
        raise pytest.UsageError(str(error)) from None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not config.getoption("--nightly"):
            item.add_marker(pytest.mark.skip(reason="long matrix: runs with --nightly (tox -e nightly)"))
        for hw in ("npu", "cuda"):
            if hw in item.keywords and config.device != hw:
                item.add_marker(pytest.mark.skip(reason=f"needs --device {hw} (this run: {config.device})"))


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return pytestconfig.device
