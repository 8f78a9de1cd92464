"""``python -m lpc_kernels.info``: versions, devices, and which backends run here (and why not)."""

import platform

import torch

from . import __version__, backends


def main() -> None:
    print(f"lpc-kernels {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"cuda: {torch.cuda.get_device_name()} (torch built for CUDA {torch.version.cuda})")
    else:
        print("cuda: no GPU visible")
    ext = backends.EXTENSION
    print(f"extension lpc_kernels._C: {'loaded: ' + ext.origin if ext.error is None else 'unavailable: ' + ext.error}")
    for device in devices:
        print(f"\nbackends for {device.type} tensors (auto -> {backends.resolve_backend('auto', device)}):")
        for backend in backends.BACKENDS:
            reason = backends.unavailable_reason(backend, device)
            print(f"  {backend:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"\navailable_backends() = {backends.available_backends()}")


if __name__ == "__main__":
    main()
