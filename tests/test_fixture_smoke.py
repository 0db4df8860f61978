from evomerge.modelio import load_model, load_tokenizer


def test_tiny_checkpoints_load(tiny_checkpoints):
    model = load_model(tiny_checkpoints["expert_a"])
    tok = load_tokenizer(tiny_checkpoints["expert_a"])
    out = model(**tok(["Question: Tom"], return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)
