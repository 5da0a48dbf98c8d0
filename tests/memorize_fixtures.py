"""A tiny model that memorized given conversations: for the memorization audit's tests."""
from __future__ import annotations


def memorize(model_dir, conversations, lr: float = 5e-3, max_steps: int = 150, target_loss: float = 0.1):
    """The model in `model_dir`, fully fine-tuned in float32 on `conversations` (loss on the last turn only) with
    AdamW until its loss is under `target_loss`: a model that memorized them."""
    import torch

    from ftpipe.model.modeling import IGNORE_INDEX, load_model, load_tokenizer, pad_batch, render_chats

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, "float32")
    fulls = render_chats(tokenizer, conversations)
    prompts = render_chats(tokenizer, [messages[:-1] for messages in conversations], add_generation_prompt=True)
    rows = []
    for full, prompt in zip(fulls, prompts):
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]})
    batch = pad_batch(rows, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(max_steps):
        loss = model(**batch).loss
        if loss.item() < target_loss:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss.item() < target_loss, f"did not memorize: loss {loss.item()}"
    return model, tokenizer
