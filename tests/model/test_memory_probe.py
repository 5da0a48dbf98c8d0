"""ftpipe/model/memory_probe.py: its probe steps need a CUDA GPU (measured on the H200 in
bench/results/gpu_train_plan.json, "memory_probe" of each stage job); what runs on the CPU is checked here."""
import warnings

from ftpipe.model.memory_probe import silence_unsloth_probe_warning


def test_unsloths_warning_after_the_probe_is_silenced_and_no_other():
    # The text Unsloth 2026.10.9 warns with when training starts after a probe (unsloth/models/_utils.py)
    text = ("Unsloth: detected a manual forward/backward run before trainer.train(); reset the torch.compile graph "
            "cache it poisoned so training starts clean. To avoid this, run any pre-train probe under "
            "`with torch.no_grad():`.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_unsloth_probe_warning()
        warnings.warn(text)
        warnings.warn("Unsloth: some other warning")
    assert [str(w.message) for w in caught] == ["Unsloth: some other warning"]
