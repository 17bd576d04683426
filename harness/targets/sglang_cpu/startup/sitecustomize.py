"""Run by Python at the start of every process of SGLang's CPU worker (this directory is first on their PYTHONPATH, and
on no other process's): the stand-ins for `sgl_kernel` and torchvision (`harness.targets.sglang_cpu`)."""
from harness.targets.sglang_cpu import prepare_process

prepare_process()
