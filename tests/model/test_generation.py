"""ftpipe.model.modeling.generate: answers stop at every end-of-sequence id of the model's generation config (Gemma's
<end_of_turn> beside its tokenizer's <eos>), and a batch that runs out of GPU memory is retried at half the size."""
import pytest

from ftpipe.core.errors import PipelineError
from ftpipe.model.modeling import generate, load_tokenizer, stop_token_ids
from tests.conftest import EMBEDDED_EOS_ID

OTHER_STOP_ID = 0   # <|endoftext|> in SmolLM2's vocabulary: a special token, not the tokenizer's eos (<|im_end|>)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_model_dir)


def scripted(model, token_ids: list[int]) -> list[int]:
    """Make the model's k-th forward call predict token_ids[k] (the last one from then on), whatever the input;
    returns the list of calls' batch sizes, which grows as the model runs."""
    import torch

    calls: list[int] = []

    def script(module, args, output):
        step = min(len(calls), len(token_ids) - 1)
        calls.append(output.shape[0])
        logits = torch.zeros_like(output)
        logits[..., token_ids[step]] = 1.0
        return logits

    model.lm_head.register_forward_hook(script)
    return calls


def test_stop_ids_are_the_generation_configs_then_the_tokenizers(model_and_tokenizer):
    import copy

    model, tokenizer = model_and_tokenizer
    assert tokenizer.eos_token_id == EMBEDDED_EOS_ID
    model = copy.copy(model)
    model.generation_config = copy.deepcopy(model.generation_config)
    for configured, expected in ((EMBEDDED_EOS_ID, [EMBEDDED_EOS_ID]), (None, [EMBEDDED_EOS_ID]),
                                 ([1, 106], [1, 106, EMBEDDED_EOS_ID]),   # Gemma: <eos>, <end_of_turn>
                                 ([OTHER_STOP_ID, EMBEDDED_EOS_ID], [OTHER_STOP_ID, EMBEDDED_EOS_ID])):
        model.generation_config.eos_token_id = configured
        assert stop_token_ids(model, tokenizer) == expected


def test_generation_stops_at_an_end_of_sequence_id_that_is_not_the_tokenizers(tiny_model_dir):
    """A model whose generation config lists another end of sequence before the tokenizer's (as Gemma lists
    <end_of_turn>): scripted to answer three words, then that id, then more words. The answer stops at it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    model.generation_config.eos_token_id = [OTHER_STOP_ID, tokenizer.eos_token_id]
    words = tokenizer(" The answer is", add_special_tokens=False).input_ids
    after = tokenizer(" never shown", add_special_tokens=False).input_ids
    calls = scripted(model, [*words, OTHER_STOP_ID, *after])
    answers, batch_size = generate(model, tokenizer, ["first prompt", "a second, longer prompt"], max_new_tokens=12,
                                   batch_size=2, desc="scripted")
    assert answers == ["The answer is", "The answer is"] and batch_size == 2
    assert len(calls) == len(words) + 1   # one forward a token: it stopped at OTHER_STOP_ID
    # The control: stopping at the tokenizer's eos alone, the answer runs on past OTHER_STOP_ID.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    calls.clear()
    answers, _ = generate(model, tokenizer, ["first prompt"], max_new_tokens=12, batch_size=1, desc="control")
    assert answers[0].startswith("The answer is never shown") and len(calls) == 12


def out_of_memory_above(model, limit: int) -> list[int]:
    """A model that runs out of GPU memory for batches of more than `limit` rows (a pre-hook on its forward
    raises torch.cuda.OutOfMemoryError, as CUDA would); returns the batch sizes it was called with."""
    import torch

    sizes: list[int] = []

    def check(module, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        sizes.append(rows)
        if rows > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake: {rows} rows > {limit})")

    model.register_forward_pre_hook(check, with_kwargs=True)
    return sizes


def test_a_batch_out_of_gpu_memory_is_halved_and_retried(tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [f"prompt number {n}" + " padding" * n for n in range(7)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    expected = [generate(model, tokenizer, [prompt], 4, 1, "one by one")[0][0] for prompt in prompts]
    sizes = out_of_memory_above(model, 3)
    capsys.readouterr()
    answers, batch_size = generate(model, tokenizer, prompts, 4, 8, "halving")
    assert batch_size == 2
    first_calls = [size for size in sizes if size > 2]
    assert first_calls == [7, 4]   # 8 prompts asked, 7 there: out of memory; 4: out of memory; then 2 fit
    assert len(answers) == len(prompts)
    # in order, each prompt's own answer (batched greedy answers of this tiny model equal the unbatched ones)
    assert answers == expected
    warnings = capsys.readouterr().err
    assert "warning: halving: out of GPU memory at a batch of 8; retrying with 4" in warnings
    assert "warning: halving: out of GPU memory at a batch of 4; retrying with 2" in warnings


def test_one_sequence_that_does_not_fit_is_an_error_naming_the_fix(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    out_of_memory_above(model, 0)
    with pytest.raises(PipelineError, match=r"one sequence alone does not fit in the GPU's free memory.*"
                                            r"evaluate\.max_new_tokens"):
        generate(model, load_tokenizer(tiny_model_dir), ["a", "b"], 4, 2, "tuned generations")
