"""CUDA graphs of the transformer body: its forward and backward pass captured once per batch shape and replayed.

Why: at small micro-batches the GPU waits for the host. One forward and backward pass of an 8B Llama through
Unsloth launches about 4,750 kernels, each after Python, the dispatcher and torch.compile's guards; at 2 rows of
2,048 tokens (the plan a 24 GB GPU gets) an H200 runs them faster than the host queues them, and is 4.5% slower
per token than at 4 rows (bench/results/gpu_train_plan.json, 8b-profile). A replayed graph is one launch: the GPU
runs the same kernels from its own queue.

What is graphed: the body of Unsloth's causal-LM forward (embeddings, decoder layers, final norm: what its
_run_backbone runs), in training, as a forward and a backward graph (torch.cuda.make_graphed_callables). The loss
head stays as it is: Unsloth's fused cross-entropy picks its target rows with nonzero(), which waits for the GPU,
and no graph can hold that (bench 1b-graphs: a capture of the whole pass fails there). A body of a shape seen
before is graphed (the first pass of a shape runs as it is: it compiles and autotunes the kernels, which a capture
must not), when the caller says the pass can be (ftpipe/model/training.py: one process, every layer's
activations kept, rows not packed). If a capture fails, the pass runs as it is and graphs stay off for the run,
with a warning naming why.

The numbers are the eager pass's: the graphs run the same kernels on the same inputs. The backward graph returns
each LoRA weight's gradient in a buffer of its own, which autograd would adopt as the weight's .grad when that is
unset, and the next replay would overwrite: the weights' .grad stay allocated instead (zeros after the optimizer
clears them), and autograd adds into them, as it does from a step's second micro-batch on.

Written here: the capture is torch's own (make_graphed_callables); what is ours is where it goes in (Unsloth's
_run_backbone, the one call that runs the whole body) and the gradients' buffers. torch.compile's
reduce-overhead mode would graph only what it compiles, and Unsloth compiles each decoder layer on its own.

torch is imported inside the functions, as everywhere in ftpipe.model.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Hashable

# Passes of a shape run as they are before it is captured: the first compiles and autotunes its kernels.
EAGER_PASSES_BEFORE_CAPTURE = 1
# make_graphed_callables' own passes before capturing (it discards their gradients): one more, on its stream.
WARMUP_PASSES = 1
# Graphs kept at once (a forward and a backward graph each). They share one memory pool, but each capture costs
# about two passes (the warm-up, the capture): batches of many shapes (rows padded to their longest) get graphs for
# their first recurring shapes and run the others as they are.
MAX_GRAPHS = 8
# What Unsloth's causal-LM forward passes to its body in a training pass; a call with anything else set runs as
# it is. The body takes input_ids and attention_mask; the count of targets is the loss head's.
BODY_KEYWORDS = {"input_ids", "causal_mask", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
                 "use_cache", "output_attentions", "output_hidden_states", "return_dict", "num_items_in_batch"}
UNSET_KEYWORDS = ("causal_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache",
                  "output_attentions", "output_hidden_states")
# The Unsloth modules whose causal-LM forward runs the body through _run_backbone
UNSLOTH_MODULES = ("unsloth.models.llama", "unsloth.models.mistral")


def to_gpu_without_waiting(batch: dict, device) -> dict:
    """A micro-batch's tensors on the GPU, copied from pinned host memory without waiting for the GPU. The trainer
    would copy them from pageable memory (where collation makes them), and CUDA makes such a copy wait for every
    kernel queued before it: the GPU would then idle at each micro-batch while the next forward pass's first
    kernels are launched. Elsewhere (the CPU) the batch as it is."""
    import torch

    if torch.device(device).type != "cuda":
        return batch
    return {key: value.pin_memory().to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def first_cause(error: BaseException) -> str:
    """The error that made a capture fail, where it was raised: the first of a chain (CUDA then refuses to end the
    capture, a second error)."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(error).__name__}: {first_line}{where}"


def body_inputs(kwargs: dict) -> tuple | None:
    """The tensors a training pass gives the body (input_ids, and attention_mask when set), or None when the call is
    not one a graph can stand for (generation, a cache, embeddings given, hidden states asked for)."""
    import torch

    if set(kwargs) - BODY_KEYWORDS or any(kwargs.get(name) not in (None, False) for name in UNSET_KEYWORDS):
        return None
    input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if not isinstance(input_ids, torch.Tensor) or not (mask is None or isinstance(mask, torch.Tensor)):
        return None
    return (input_ids,) if mask is None else (input_ids, mask)


class BackboneGraphs:
    """Replays the body of each training pass as CUDA graphs, one pair per input shape.

    install() puts run_backbone in place of Unsloth's _run_backbone; use(plan) says, before each pass, whether
    it may be graphed (a plan, for which graphs are kept; None: run it as it is). A new plan drops the graphs."""

    def __init__(self, parameters, device, max_graphs: int = MAX_GRAPHS):
        self.parameters = [parameter for parameter in parameters if parameter.requires_grad]
        self.device = device
        self.max_graphs = max_graphs
        self.gradients: list | None = None   # each parameter's .grad, kept: autograd adds the graphs' into them
        self.graphs: dict[Hashable, Any] = {}
        self.seen: dict[Hashable, int] = {}
        self.pool = None
        self.plan: Hashable = None
        self.graphed_plan: Hashable = None   # the plan the graphs held were captured under
        self.off_reason: str | None = None   # why graphs are off for the rest of the run
        self.originals: dict[Any, Callable] = {}   # each patched module's own _run_backbone
        self.captures = self.replays = self.eager_passes = 0

    def install(self) -> str | None:
        """Put run_backbone in place of _run_backbone in Unsloth's modules; None, or why it cannot be."""
        patched = {name: sys.modules[name] for name in UNSLOTH_MODULES
                   if callable(getattr(sys.modules.get(name), "_run_backbone", None))}
        if not patched:
            return "this Unsloth runs no _run_backbone (CUDA graphs go in there)"
        for module in patched.values():
            original = module._run_backbone
            self.originals[module] = original

            def run_backbone(causal_lm, original=original, **kwargs):
                return self.run_backbone(original, causal_lm, **kwargs)

            module._run_backbone = run_backbone
        return None

    def uninstall(self) -> None:
        for module, original in self.originals.items():
            module._run_backbone = original
        self.originals.clear()
        self.release()

    def use(self, plan: Hashable) -> None:
        self.plan = plan

    def run_backbone(self, original: Callable, causal_lm, **kwargs):
        """Unsloth's _run_backbone, replayed as graphs where the pass may be."""
        import torch

        if self.plan is None or not (torch.is_grad_enabled() and causal_lm.training):
            return original(causal_lm, **kwargs)   # not a training pass the caller offers
        inputs = body_inputs(kwargs) if self.off_reason is None else None
        graphed = self._graphed(original, causal_lm, kwargs, inputs) if inputs is not None else None
        if graphed is None:
            self.eager_passes += 1
            return original(causal_lm, **kwargs)
        self._attach_gradients()
        hidden = graphed(*inputs)
        self.replays += 1
        return body_output(hidden, kwargs.get("return_dict", True))

    def _graphed(self, original: Callable, causal_lm, kwargs: dict, inputs: tuple):
        """The graphs of this body call: held, captured now (a shape seen before), or None."""
        if self.plan != self.graphed_plan:
            self.release()
            self.graphed_plan = self.plan
        # the call's other settings: the body's graphs hold them as they were at the capture
        settings = {name: value for name, value in kwargs.items()
                    if name not in ("input_ids", "attention_mask", "num_items_in_batch")}
        key = (tuple((tuple(tensor.shape), tensor.dtype) for tensor in inputs),
               tuple(sorted((name, repr(value)) for name, value in settings.items())))
        graphed = self.graphs.get(key)
        if graphed is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] > EAGER_PASSES_BEFORE_CAPTURE and len(self.graphs) < self.max_graphs:
                graphed = self._capture(key, original, causal_lm, settings, inputs)
        return graphed

    def summary(self) -> dict:
        """For the run's metrics: graphs captured, passes replayed and run as they are, and why graphs went off."""
        return {"captured_graphs": self.captures, "replayed_passes": self.replays, "eager_passes": self.eager_passes,
                "off_reason": self.off_reason}

    def free_after_running_out(self) -> str | None:
        """After a step ran out of memory: drop the graphs and turn them off for the run (a pass of a shape without a
        graph needs memory of its own beside their pool), saying so; None when none were held."""
        if not self.graphs:
            return None
        self._turn_off(f"a step ran out of memory beside the pool of {len(self.graphs)} CUDA graph(s) (passes of "
                       f"other shapes need memory of their own)")
        return "dropped its CUDA graphs (off for the rest of the run)"

    def _turn_off(self, reason: str) -> None:
        """Graphs off for the rest of the run: their memory and the gradients' buffers given back (passes run as
        they are allocate their own)."""
        self.off_reason = reason
        self.release()
        self.gradients = None

    def release(self) -> None:
        """Drop the graphs and their memory pool."""
        import torch

        if not self.graphs and self.pool is None:
            return
        self.graphs.clear()
        self.seen.clear()
        self.pool = None
        gc.collect()
        torch.cuda.empty_cache()

    def _attach_gradients(self) -> None:
        """Make each parameter's .grad the tensor autograd adds the graphs' gradients into: zeros after the optimizer
        cleared the gradients (set to None), or the gradient a pass run as it is made earlier in the step."""
        import torch

        if self.gradients is None:
            self.gradients = [torch.zeros_like(parameter) for parameter in self.parameters]
        cleared = []
        for parameter, gradient in zip(self.parameters, self.gradients):
            current = parameter.grad
            if current is gradient:
                continue
            if current is None:
                cleared.append(gradient)
            else:
                gradient.copy_(current)
            parameter.grad = gradient
        if cleared:
            torch._foreach_zero_(cleared)

    def _capture(self, key: Hashable, original: Callable, causal_lm, settings: dict, inputs: tuple):
        body = body_module(original, causal_lm, settings, with_mask=len(inputs) == 2)
        if self.pool is None:
            self.pool = graph_pool(self.device)
        try:
            graphed = capture_body(body, inputs, self.pool)
        except Exception as error:   # noqa: BLE001 - any failure: run as it is, graphs off, the reason shown
            self._give_back_capture_memory()
            self._turn_off(f"capturing a pass failed ({first_cause(error)})")
            print(f"warning: train: CUDA graphs off for this run: {self.off_reason}; training goes on without them",
                  file=sys.stderr, flush=True)
            return None
        self.graphs[key] = graphed
        self.captures += 1
        return graphed

    def _give_back_capture_memory(self) -> None:
        """After a failed capture: the pool's memory back (release() then frees it). When CUDA refuses to end a
        capture, torch's CUDAGraph raises before it tells the allocator the capture is over, and the pool keeps what
        the capture allocated for good; the allocator's own calls release it."""
        import torch

        if self.pool is not None:
            device = torch.device(self.device).index or 0
            for release in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
                with contextlib.suppress(Exception):   # already done when the capture ended cleanly
                    getattr(torch._C, release)(device, self.pool)


def body_module(original: Callable, causal_lm, settings: dict, with_mask: bool):
    """The body as a module taking the pass's tensors (make_graphed_callables graphs a module's parameters'
    gradients): Unsloth's _run_backbone with the call's other settings, its hidden states out."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = causal_lm.model   # its parameters: the LoRA weights the backward graph differentiates

        def forward(self, input_ids, attention_mask=None):
            mask = {"attention_mask": attention_mask} if with_mask else {}
            return original(causal_lm, input_ids=input_ids, **mask, **settings)[0]

    return Body().train(causal_lm.training)


def graph_pool(device):
    """A memory pool the graphs share (they run one after another); None off the GPU."""
    import torch

    return torch.cuda.graph_pool_handle() if torch.device(device).type == "cuda" else None


def capture_body(body, inputs: tuple, pool):
    """The body's forward and backward graphs (torch.cuda.make_graphed_callables), sharing `pool`."""
    import torch

    # the stream current now is current again after a failed capture (torch's own context would not restore it);
    # make_graphed_callables refuses autocast's cast cache: the same casts, made in each pass
    with torch.cuda.stream(torch.cuda.current_stream()), torch.autocast(
            "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
            cache_enabled=False):
        return torch.cuda.make_graphed_callables(body, inputs, num_warmup_iters=WARMUP_PASSES, pool=pool)


def body_output(hidden, return_dict: bool):
    """What _run_backbone returns, from the body's hidden states: the model output, or its tuple form."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=hidden) if return_dict in (True, None) else (hidden,)
