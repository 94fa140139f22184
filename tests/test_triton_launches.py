"""Launches of one CUDA-path step, counted without a GPU (``mgup_dist.opcount``: params on the
``meta`` device, Triton launches stubbed, every non-view ATen op on the device counted).  The
count is a property of the engine's design: it must not grow with the number of tensors."""
import pytest

pytest.importorskip("triton")

from _triton_mode import interpreted  # noqa: E402

from mgup_dist import CMGUPAdamW, MGUPAdamW, MGUPLion  # noqa: E402
from mgup_dist.opcount import count_step, model_params  # noqa: E402

pytestmark = pytest.mark.skipif(interpreted(), reason="counts compiled launches: triton imported in interpreter mode")

#: launches a step (host step counter, capturable): 9 Triton kernels + the tie ranks' small ops;
#: capturable adds the optimizer's device step counter and bias corrections (4 ops), read in
#: place by the kernels
LIMITS = {"MGUPAdamW": (MGUPAdamW, 24, 30), "MGUPLion": (MGUPLion, 24, 24), "CMGUPAdamW": (CMGUPAdamW, 1, 5)}


@pytest.mark.parametrize("capturable", [False, True], ids=["host-step", "capturable"])
@pytest.mark.parametrize("name", sorted(LIMITS))
def test_launches_per_step_on_llama130m(name, capturable):
    cls, host_limit, cap_limit = LIMITS[name]
    limit = cap_limit if capturable else host_limit
    counts = []
    for split in (1, 3):  # 111 tensors, then the same 134M elements in 333 tensors
        make = lambda ps: cls(ps, lr=1e-3, backend="triton", capturable=capturable)  # noqa: E731
        res = count_step(make, model_params("llama130m", split))
        assert res["triton"] >= 1, res["ops"]
        counts.append(res["total"])
    assert counts[0] <= limit, (name, counts[0], limit)
    assert counts[1] == counts[0], f"launches grow with the number of tensors: {counts}"
