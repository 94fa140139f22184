"""Backends: one implementation of the phases per kind of device, behind one interface
(``base.Backend``), chosen by ``get_backend`` from facts identical on every rank (the
device type of the group's params and its hyperparameters), never from local data.

    base.py          the interface and the order-key definition every backend shares
    torch_ops.py     plain torch ops, batched and sync-free: any device (NPU, ...)
    cpu.py           CPU: introselect (numpy) for whole tensors, Inductor-fused phases (compile=True)
    triton_cuda.py   CUDA: multi-tensor Triton kernels (imported lazily: never on CPU-only installs)
"""
