"""The logit lens (issue 28, item 3): a direction's promoted and suppressed tokens through the model's own final norm
and unembedding, and each layer's next-token reading of the residual."""

import pytest
import torch

from emlens.base.errors import EmlensInputError
from emlens.directions.lens import direction_tokens, residual_lens, unembed
from emlens.sites import hook_site
from tests.cli_runner import one_line_error, run_cli


def test_the_last_layers_residual_through_the_lens_is_the_models_own_logits(tiny):
    ids = tiny.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    seen = {}
    hook = hook_site(tiny.base_model, tiny.n_layers - 1, "resid_post", lambda h: seen.update(h=h.clone()))
    with torch.inference_mode():
        logits = tiny.model(input_ids=ids).logits[0].float()
    hook.remove()
    assert torch.allclose(unembed(tiny, seen["h"][0]), logits, atol=1e-5)


def test_a_planted_token_is_what_its_direction_promotes_and_its_negative_suppresses(tiny):
    head = tiny.base_model.get_output_embeddings().weight
    target = 123
    with torch.no_grad():
        head[target] *= 8  # one unembedding row far longer than the rest: its own direction favours it
    table = direction_tokens(tiny, head[target].detach().clone(), top=5)
    assert table.promoted.iloc[0] == tiny.tokenizer.decode([target])
    assert direction_tokens(tiny, -head[target].detach().clone()).suppressed.iloc[0] == tiny.tokenizer.decode([target])
    scaled = direction_tokens(tiny, 3 * head[target].detach().clone(), top=5)
    assert scaled.promoted.tolist() == table.promoted.tolist()  # the final norm makes the lens scale-free
    assert (table.promoted_logit.diff().dropna() <= 0).all() and (table.suppressed_logit.diff().dropna() >= 0).all()
    with pytest.raises(EmlensInputError, match="width 63"):
        direction_tokens(tiny, torch.ones(63))


def test_the_front_door_reads_a_direction_as_the_lens_does(tiny):
    import emlens as em

    vector = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    assert em.direction_tokens(tiny, vector, top=3).equals(direction_tokens(tiny, vector, top=3))


def test_the_residual_lens_ends_at_the_models_own_next_token(tiny):
    chat = [{"role": "user", "content": "hi there"}]
    table = residual_lens(tiny, ["The quick brown", chat], top=3)
    assert set(table.layer) == {0, 1, 2} and len(table) == 2 * 3 * 3
    with torch.inference_mode():
        ids = tiny.tokenizer("The quick brown", return_tensors="pt", add_special_tokens=False)["input_ids"]
        own = tiny.tokenizer.decode([int(tiny.model(input_ids=ids).logits[0, -1].argmax())])
    last = table[(table.prompt == 0) & (table.layer == 2)]
    assert last.token.iloc[0] == own and last.final_prob.iloc[0] == pytest.approx(last.prob.iloc[0])
    assert ((table.prob > 0) & (table.prob <= 1) & (table.final_prob <= 1)).all()
    with pytest.raises(EmlensInputError, match="layers 0-2"):
        residual_lens(tiny, ["x"], layers=[5])


def test_lens_command_prints_a_directions_tokens_and_refuses_a_missing_folder(tiny_model_dir, tmp_path, capsys):
    from emlens.directions.fit import fit_direction

    torch.manual_seed(0)
    acts = {f"blocks.{layer}.hook_resid_post": torch.randn(16, 64) for layer in range(3)}
    fit_direction(acts, torch.tensor([1, 0] * 8), method="diff_of_means").save(tmp_path / "d")
    assert run_cli("lens", tmp_path / "d", "--model", tiny_model_dir, "--top", "4") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "promoted", "logit", "suppressed", "logit"] and len(out) == 1 + 4
    err = one_line_error(capsys, run_cli("lens", tmp_path / "missing", "--model", tiny_model_dir))
    assert "missing" in err
