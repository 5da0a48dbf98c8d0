"""ftpipe.model.cuda_graphs: which bodies are replayed as graphs (a training pass whose shapes were seen before, when
the caller allows it, up to MAX_GRAPHS), that replayed bodies give the eager passes' losses and gradients (added into
the kept .grad), that a new plan drops the graphs, that a failed capture or running out of memory turns them off
with the reason, and the patch of Unsloth's _run_backbone. On the CPU, torch's capture is stood in for by an autograd
function that returns the weights' gradients in buffers of its own, as make_graphed_callables' backward graph does
(FakeCapture); CUDA's own capture is checked on the GPU against the eager pass (bench/gpu_train_plan.py, the graphs
jobs)."""
import re
import sys
import types

import pytest

from ftpipe.model import cuda_graphs
from ftpipe.model.cuda_graphs import BackboneGraphs, body_inputs, to_gpu_without_waiting


class FakeCapture:
    """capture_body on the CPU: the body as an autograd function whose forward runs it and whose backward returns
    each trainable weight's gradient in a buffer of its own, overwritten at each backward, as the backward graph
    of torch.cuda.make_graphed_callables does. Records the inputs' shapes of each capture."""

    def __init__(self):
        self.captured = []

    def __call__(self, body, inputs, pool):
        import torch

        self.captured.append([tuple(tensor.shape) for tensor in inputs])
        parameters = tuple(body.parameters())
        buffers = [torch.zeros_like(parameter) if parameter.requires_grad else None for parameter in parameters]
        users = len(inputs)

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                with torch.enable_grad():
                    ctx.out = body.forward(*args[:users])
                return ctx.out.detach()

            @staticmethod
            def backward(ctx, grad):
                trainable = [parameter for parameter in parameters if parameter.requires_grad]
                grads = iter(torch.autograd.grad(ctx.out, trainable, grad))
                for buffer in buffers:
                    if buffer is not None:
                        buffer.copy_(next(grads))
                return (None,) * users + tuple(None if buffer is None else buffer.detach() for buffer in buffers)

        return lambda *args: Graphed.apply(*args, *parameters)


@pytest.fixture
def fake_capture(monkeypatch):
    capture = FakeCapture()
    monkeypatch.setattr(cuda_graphs, "capture_body", capture)
    return capture


class CausalLM:
    """A stand-in for Unsloth's causal LM: a body (embeddings and a layer with a trainable weight, a frozen one
    beside it) and a loss head, in training mode."""

    def __init__(self):
        import torch

        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 4), torch.nn.Tanh()).double()
        self.model[0].weight.requires_grad_(False)   # frozen, as the 4-bit base
        self.head = torch.nn.Linear(4, 11).double().requires_grad_(False)
        self.training = True

    def parameters(self):
        return self.model.parameters()


def run_backbone(causal_lm, **kwargs):
    """Unsloth's _run_backbone: the body's output, which the head reads as [0]."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=causal_lm.model(kwargs["input_ids"]))


def batches(steps: int, micro: int, width: int = 5, passes: int = 2) -> list[list[dict]]:
    import torch

    generator = torch.Generator().manual_seed(1)
    return [[{"input_ids": torch.randint(0, 11, (micro, width), generator=generator),
              "labels": torch.randint(0, 11, (micro, width), generator=generator)} for _ in range(passes)]
            for _ in range(steps)]


def train(causal_lm, steps, backbone) -> tuple[list[float], list]:
    """SGD steps over micro-batches whose losses are summed over the step's target count, gradients cleared to None
    after each step (as the trainer's optimizer does)."""
    import torch

    losses = []
    for step in steps:
        count = sum(batch["labels"].numel() for batch in step)
        loss = 0.0
        for batch in step:
            hidden = backbone(causal_lm, input_ids=batch["input_ids"], attention_mask=None, return_dict=True)[0]
            logits = causal_lm.head(hidden)
            added = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                      reduction="sum") / count
            added.backward()
            loss += float(added.detach())
        losses.append(loss)
        with torch.no_grad():
            for parameter in causal_lm.parameters():
                if parameter.requires_grad:
                    parameter -= 0.5 * parameter.grad
        for parameter in causal_lm.parameters():
            parameter.grad = None
    return losses, [parameter.detach().clone() for parameter in causal_lm.parameters()]


def graphed_backbone(graphs: BackboneGraphs, plan="plan"):
    def backbone(causal_lm, **kwargs):
        graphs.use(plan)
        return graphs.run_backbone(run_backbone, causal_lm, **kwargs)

    return backbone


def graphed_like_eager(steps) -> BackboneGraphs:
    """Trains a fresh CausalLM on `steps` with its body run as it is and through BackboneGraphs; asserts the same
    losses and weights, bit for bit, and returns the graphs."""
    import torch

    eager_losses, eager_weights = train(CausalLM(), steps, run_backbone)
    causal_lm = CausalLM()
    graphs = BackboneGraphs(causal_lm.parameters(), "cpu")
    losses, weights = train(causal_lm, steps, graphed_backbone(graphs))
    assert losses == eager_losses
    assert all(torch.equal(left, right) for left, right in zip(weights, eager_weights))
    return graphs


def test_replayed_bodies_give_the_eager_losses_and_weights_bit_for_bit(fake_capture):
    graphs = graphed_like_eager(batches(steps=4, micro=2))
    # the first pass of the shape ran as it is, the second was captured, then every one replayed
    assert graphs.summary() == {"captured_graphs": 1, "replayed_passes": 7, "eager_passes": 1, "off_reason": None}
    assert fake_capture.captured == [[(2, 5)]]


def test_a_step_mixing_eager_and_replayed_bodies_sums_their_gradients(fake_capture):
    """A shape's first pass runs as it is in a step whose other passes are replayed: autograd adds the graph's
    gradient into the one that pass made."""
    first, second = batches(steps=1, micro=2)[0], batches(steps=1, micro=3, passes=1)[0]
    step = [first[0], second[0], first[1]]   # (2, 5), then (3, 5) for the first time, then (2, 5) again
    graphs = graphed_like_eager([step, step])
    # step 1: (2) and (3) as they are, (2) captured and replayed; step 2: (3) captured, every pass replayed
    assert graphs.summary()["eager_passes"] == 2 and graphs.summary()["replayed_passes"] == 4


def test_a_pass_the_caller_keeps_off_graphs_runs_as_it_is(fake_capture):
    causal_lm = CausalLM()
    graphs = BackboneGraphs(causal_lm.parameters(), "cpu")
    train(causal_lm, batches(steps=3, micro=2), graphed_backbone(graphs, plan=None))
    assert graphs.summary() == {"captured_graphs": 0, "replayed_passes": 0, "eager_passes": 0, "off_reason": None}
    assert fake_capture.captured == []


@pytest.mark.parametrize("extra", [{"past_key_values": ((1,),)}, {"output_hidden_states": True},
                                   {"inputs_embeds": "embeddings"}, {"use_cache": True}, {"labels": "given"}])
def test_a_call_that_is_not_a_training_pass_body_is_never_graphed(extra):
    import torch

    call = {"input_ids": torch.zeros((1, 2), dtype=torch.long), "attention_mask": None, "return_dict": True}
    assert body_inputs(call) == (call["input_ids"],)
    assert body_inputs({**call, "attention_mask": torch.ones((1, 2))})[1].shape == (1, 2)
    assert body_inputs({**call, **extra}) is None


def test_without_gradients_or_in_eval_mode_the_body_runs_as_it_is(fake_capture):
    import torch

    causal_lm = CausalLM()
    graphs = BackboneGraphs(causal_lm.parameters(), "cpu")
    graphs.use("plan")
    ids = torch.zeros((1, 3), dtype=torch.long)
    with torch.no_grad():
        for _ in range(3):
            graphs.run_backbone(run_backbone, causal_lm, input_ids=ids)
    causal_lm.training = False
    for _ in range(3):
        graphs.run_backbone(run_backbone, causal_lm, input_ids=ids)
    assert fake_capture.captured == [] and graphs.summary()["eager_passes"] == 0


def test_at_most_max_graphs_are_captured_and_other_shapes_run_as_they_are(fake_capture):
    causal_lm = CausalLM()
    graphs = BackboneGraphs(causal_lm.parameters(), "cpu", max_graphs=2)
    steps = [step for width in (3, 4, 5) for step in batches(steps=1, micro=1, width=width, passes=2)]
    train(causal_lm, steps, graphed_backbone(graphs))
    assert fake_capture.captured == [[(1, 3)], [(1, 4)]]
    assert graphs.summary()["eager_passes"] == 4 and graphs.summary()["replayed_passes"] == 2


def test_a_new_plan_drops_the_graphs_of_the_one_before(fake_capture):
    causal_lm = CausalLM()
    graphs = BackboneGraphs(causal_lm.parameters(), "cpu")
    steps = batches(steps=3, micro=2, passes=1)
    train(causal_lm, steps, graphed_backbone(graphs, "first"))
    assert len(graphs.graphs) == 1
    train(causal_lm, steps, graphed_backbone(graphs, "second"))
    # the second plan's first pass ran as it is again, and its graph was captured anew
    assert graphs.summary() == {"captured_graphs": 2, "replayed_passes": 4, "eager_passes": 2, "off_reason": None}


def test_a_failed_capture_turns_graphs_off_names_its_first_cause_and_the_pass_still_counts(monkeypatch, capsys):
    def failing(body, inputs, pool):
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        finally:   # as CUDA then refuses to end the capture: the first error is the one named
            raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(cuda_graphs, "capture_body", failing)
    graphs = graphed_like_eager(batches(steps=2, micro=2))
    reason = graphs.summary()["off_reason"]
    assert re.fullmatch(r"capturing a pass failed \(RuntimeError: operation not permitted when stream is capturing "
                        r"at test_cuda_graphs\.py:\d+ in failing\)", reason)
    assert graphs.summary() == {"captured_graphs": 0, "replayed_passes": 0, "eager_passes": 4, "off_reason": reason}
    assert capsys.readouterr().err.count(f"warning: train: CUDA graphs off for this run: {reason}") == 1


def test_running_out_of_memory_drops_the_graphs_and_turns_them_off(fake_capture):
    causal_lm = CausalLM()
    graphs = BackboneGraphs(causal_lm.parameters(), "cpu")
    assert graphs.free_after_running_out() is None   # nothing held: the planner falls back to a smaller plan
    steps = batches(steps=2, micro=2)
    train(causal_lm, steps, graphed_backbone(graphs))
    assert graphs.free_after_running_out() == "dropped its CUDA graphs (off for the rest of the run)"
    assert graphs.graphs == {} and graphs.off_reason.startswith("a step ran out of memory beside the pool of 1 CUDA")
    train(causal_lm, steps, graphed_backbone(graphs))
    assert graphs.summary()["eager_passes"] == 5 and len(fake_capture.captured) == 1


def test_install_routes_unsloths_body_through_the_graphs_and_uninstall_restores_it(monkeypatch, fake_capture):
    llama = types.ModuleType("unsloth.models.llama")
    llama._run_backbone = run_backbone
    monkeypatch.setitem(sys.modules, "unsloth.models.llama", llama)
    causal_lm = CausalLM()
    graphs = BackboneGraphs(causal_lm.parameters(), "cpu")
    assert graphs.install() is None and llama._run_backbone is not run_backbone
    train(causal_lm, batches(steps=1, micro=1), lambda model, **kwargs: (graphs.use("plan"),
                                                                        llama._run_backbone(model, **kwargs))[1])
    assert graphs.summary()["eager_passes"] == 1 and graphs.summary()["replayed_passes"] == 1
    graphs.uninstall()
    assert llama._run_backbone is run_backbone


def test_without_unsloths_run_backbone_graphs_say_why_not(monkeypatch):
    for name in cuda_graphs.UNSLOTH_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    graphs = BackboneGraphs([], "cpu")
    assert graphs.install() == "this Unsloth runs no _run_backbone (CUDA graphs go in there)"


def test_off_the_gpu_a_micro_batch_stays_as_collated():
    # on a GPU its tensors are copied from pinned memory without waiting (measured in bench/gpu_train_plan.py);
    # elsewhere the trainer moves the batch itself, and nothing is copied here
    import torch

    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])}
    assert to_gpu_without_waiting(batch, torch.device("cpu")) is batch
    assert to_gpu_without_waiting(batch, "cpu") is batch
