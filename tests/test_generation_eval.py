"""Generation-quality evaluation (teal.generation_eval, evaluate_generation.py): the metrics
against hand-computed values and an independent computation on a tiny random model, the
prompt-file errors, and the CLI end to end on a tiny checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch

import evaluate_generation
from teal.generation_eval import (Prompt, PromptFileError, agreement, dense_perplexity,
                                  greedy_continuation, load_prompts, repeated_ngram_rate,
                                  run_configuration)
from tiny_models import VOCAB, noise_calibration, tiny_model, write_checkpoint


# ----------------------------------------------------------------------------- repeats
def test_repeated_ngram_rate_no_repeats():
    assert repeated_ngram_rate([1, 2, 3, 4, 5, 6, 7], n=4) == 0.0


def test_repeated_ngram_rate_hand_computed():
    # 4-grams of 1 2 3 4 1 2 3 4 1: (1234) (2341) (3412) (4123) (1234)* (2341)* -> 2 of 6
    assert repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4, 1], n=4) == pytest.approx(2 / 6)
    # a constant run of 7: 4 four-grams, all but the first repeat
    assert repeated_ngram_rate([9] * 7, n=4) == pytest.approx(3 / 4)
    # bigrams of 5 6 5 6 7 5 6: (56) (65) (56)* (67) (75) (56)* -> 2 of 6
    assert repeated_ngram_rate(torch.tensor([5, 6, 5, 6, 7, 5, 6]), n=2) == pytest.approx(2 / 6)


def test_repeated_ngram_rate_short_sequences_are_zero():
    assert repeated_ngram_rate([], n=4) == 0.0
    assert repeated_ngram_rate([3, 3, 3], n=4) == 0.0
    assert repeated_ngram_rate([3, 3, 3, 3], n=4) == 0.0    # one 4-gram: nothing earlier
    assert repeated_ngram_rate([3, 3, 3, 3, 3], n=4) == 0.5  # n + 1 tokens: two 4-grams
    with pytest.raises(ValueError):
        repeated_ngram_rate([1, 2], n=0)


def test_repeated_ngram_rate_random_against_brute_force():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        ids = torch.randint(0, 4, (int(torch.randint(5, 40, (1,), generator=g)),),
                            generator=g).tolist()
        grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
        rep = sum(grams[i] in grams[:i] for i in range(len(grams)))
        assert repeated_ngram_rate(ids, n=3) == pytest.approx(rep / len(grams))


# ----------------------------------------------------------------------------- agreement
def test_agreement_zero_partial_full():
    dense = [11, 12, 13, 14, 15]
    assert agreement([10, 12, 13, 14, 15], dense) == 0
    assert agreement([11, 12, 99, 14, 15], dense) == 2
    assert agreement(list(dense), dense) == 5
    assert agreement(torch.tensor(dense), torch.tensor(dense)) == 5
    assert agreement([11, 12], dense) == 2          # stopped early but agreed so far
    assert agreement([], dense) == 0


# ----------------------------------------------------------------------------- perplexity
def _independent_ppl(model, prompt, cont):
    x = torch.cat([prompt, cont])
    with torch.no_grad():
        logits = model(x[None])[0].double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    P = prompt.numel()
    nll = -sum(logp[P - 1 + i, int(cont[i])].item() for i in range(cont.numel()))
    return math.exp(nll / cont.numel())


def test_dense_perplexity_matches_independent_computation():
    import teal
    model = tiny_model(seed=4)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, VOCAB, (9,), generator=g)
    cont = torch.randint(0, VOCAB, (13,), generator=g)
    want = _independent_ppl(model, prompt, cont)
    assert dense_perplexity(model, prompt, cont) == pytest.approx(want, rel=1e-5)
    assert dense_perplexity(model, prompt.tolist(), cont.tolist()) == pytest.approx(want, rel=1e-5)
    # a sparsified model is judged by its dense self, and its flags come back unchanged
    from teal.allocation import apply_config
    apply_config(model, noise_calibration(model.config, n=2048), 0.6)
    teal.configure(model, sparsify_prefill=True)
    sparse_ppl = _independent_ppl(model, prompt, cont)
    assert abs(sparse_ppl - want) > 1e-3 * want      # sparsity changes the logits...
    assert dense_perplexity(model, prompt, cont) == pytest.approx(want, rel=1e-5)  # ...not this
    assert all(m.sparse and m.sparsify_prefill for m in teal.sparse_linears(model))


def test_dense_perplexity_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one"):
        dense_perplexity(model, [1, 2], [])
    with pytest.raises(ValueError, match="at least one"):
        dense_perplexity(model, [], [1])


def test_greedy_continuation_is_the_teacher_forced_argmax():
    model = tiny_model(seed=2)
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(8))
    cont, stopped = greedy_continuation(model, prompt.tolist(), 10)
    assert len(cont) == 10 and not stopped
    with torch.no_grad():
        logits = model(torch.cat([prompt, torch.tensor(cont)])[None])[0]
    assert logits[prompt.numel() - 1:-1].argmax(-1).tolist() == cont
    # an end token stops it, kept as the last token
    short, stopped = greedy_continuation(model, prompt.tolist(), 10, stop_ids={cont[3]})
    assert stopped and short == cont[:cont.index(cont[3]) + 1]


def test_run_configuration_measures_sparsity_on_decode():
    from teal.allocation import apply_config
    model = tiny_model(seed=6)
    apply_config(model, noise_calibration(model.config, n=2048), 0.5)
    prompts = [torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(s)).tolist()
               for s in (1, 2)]
    conts, measured = run_configuration(model, prompts, 6)
    assert len(conts) == 2 and all(len(c) == 6 for c, _ in conts)
    assert measured is not None and 0.0 < measured < 1.0
    import teal
    _, none = run_configuration(model, prompts, 6, sparse=False)
    assert none is None and all(not m.track for m in teal.sparse_linears(model))


# ----------------------------------------------------------------------------- prompt files
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_prompts_ok_and_repo_file(tmp_path):
    p = _write(tmp_path / "p.jsonl", [json.dumps(dict(id="a", kind="chat", domain="x", text="Hi")),
                                      "",
                                      json.dumps(dict(id="b", kind="plain", domain="y", text="Yo"))])
    assert load_prompts(p) == [Prompt("a", "chat", "x", "Hi"), Prompt("b", "plain", "y", "Yo")]
    repo = load_prompts(evaluate_generation.DEFAULT_PROMPTS)
    assert len(repo) >= 50 and {q.kind for q in repo} == {"chat", "plain"}
    assert len({q.domain for q in repo}) >= 6
    assert Prompt("sea_poem", "chat", "poetry", "Write a short poem about the sea.") in repo


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "none.jsonl")


def test_load_prompts_bad_json_names_line(tmp_path):
    good = json.dumps(dict(id="a", kind="chat", domain="x", text="Hi"))
    p = _write(tmp_path / "p.jsonl", [good, '{"id": "b", "kind": '])
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: not valid JSON"):
        load_prompts(p)


@pytest.mark.parametrize("obj,msg", [
    (dict(kind="chat", domain="x", text="Hi"), "missing field 'id'"),
    (dict(id="a", kind="chat", domain="x"), "missing field 'text'"),
    (dict(id="a", kind="poem", domain="x", text="Hi"), "kind must be"),
    (dict(id="a", kind="chat", domain="x", text=3), "must be a string"),
    (dict(id="a", kind="chat", domain="x", text=""), "empty text"),
    (dict(id="first", kind="chat", domain="x", text="Hi"), "already used on line 1"),
    (["a"], "expected a JSON object"),
])
def test_load_prompts_bad_line(tmp_path, obj, msg):
    first = json.dumps(dict(id="first", kind="plain", domain="x", text="Hey"))
    p = _write(tmp_path / "p.jsonl", [first, json.dumps(obj)])
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: .*" + msg):
        load_prompts(p)


def test_load_prompts_empty_and_not_utf8(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(tmp_path / "b.jsonl")


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random model with a word-level tokenizer ('w<i>' -> i), end token id 7, and
    thresholds calibrated on noise."""
    from teal.checkpoint import load_checkpoint, save_checkpoint
    d = tmp_path_factory.mktemp("gen_eval")
    model = tiny_model(seed=11)
    path = write_checkpoint(d, model)
    ck = load_checkpoint(path)
    ck["meta"]["tokenizer"]["eos_id"] = 7
    save_checkpoint(path, ck["config"], ck["state_dict"], ck["meta"])
    noise_calibration(model.config).save(d / "thresholds.safetensors")
    g = torch.Generator().manual_seed(12)
    lines = []
    for i, kind in enumerate(["chat", "plain", "plain"]):
        words = " ".join(f"w{int(t)}" for t in torch.randint(8, VOCAB - 1, (6,), generator=g))
        lines.append(json.dumps(dict(id=f"p{i}", kind=kind, domain="test", text=words)))
    _write(d / "prompts.jsonl", lines)
    return d


def test_cli_end_to_end_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "gen.json"
    rc = evaluate_generation.main([
        "--checkpoint_path", str(tiny_ckpt / "model.pth"), "--prompts",
        str(tiny_ckpt / "prompts.jsonl"), "--sparsity", "0.3", "0.6", "--max_new_tokens", "12",
        "--device", "cpu", "--json", str(out), "--show", "p1", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dense ppl" in printed and "rep-4gram" in printed and "=== p1 | dense" in printed
    data = json.loads(out.read_text())
    assert {"checkpoint", "prompts", "max_new_tokens", "results"} <= set(data)
    res = data["results"]
    assert [r["config"] for r in res] == ["dense", "0.30 uniform magnitude dense",
                                         "0.60 uniform magnitude dense"]
    keys = {"mean_dense_perplexity", "mean_repeated_ngram_rate", "mean_agreement",
            "measured_sparsity", "mean_new_tokens", "prompts"}
    assert all(keys <= set(r) for r in res)
    dense = res[0]
    assert dense["measured_sparsity"] == 0.0
    for rec in dense["prompts"]:   # the reference agrees with itself over its whole length
        assert rec["agreement"] == rec["new_tokens"] and 1 <= rec["new_tokens"] <= 12
        assert {"id", "kind", "domain", "text", "dense_perplexity", "repeated_ngram_rate",
                "stopped"} <= set(rec)
        assert rec["dense_perplexity"] >= 1.0
    for r in res[1:]:
        assert r["measured_sparsity"] is not None and 0.0 < r["measured_sparsity"] < 1.0
        assert all(0 <= p["agreement"] <= p["new_tokens"] for p in r["prompts"])
    assert res[2]["measured_sparsity"] > res[1]["measured_sparsity"]


def test_cli_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    base = ["--checkpoint_path", str(tiny_ckpt / "model.pth"), "--device", "cpu", "--quiet",
            "--max_new_tokens", "2"]
    assert evaluate_generation.main(base + ["--prompts", str(tmp_path / "no.jsonl")]) == 1
    assert "prompt file" in capsys.readouterr().err.strip().splitlines()[-1]
    assert evaluate_generation.main(base + ["--prompts", str(tiny_ckpt / "prompts.jsonl"),
                                            "--show", "nope"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --show nope")
    assert evaluate_generation.main(base + ["--device", "tpu"]) == 1
    assert "unknown --device" in capsys.readouterr().err
    assert evaluate_generation.main(["--checkpoint_path", str(tmp_path / "m.pth"),
                                     "--device", "cpu", "--prompts",
                                     str(tiny_ckpt / "prompts.jsonl")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_sequential_calibration_and_weight_scoring(tiny_ckpt, tmp_path):
    """The perplexity.py configuration flags work here too: both calibrations (sequential:
    re-derived on a text of whole windows, so the measured sparsity is near the target); a
    scoring the thresholds file cannot serve is a one-line error."""
    from tiny_models import write_text
    text = write_text(tmp_path / "calib.txt", 3 * 128)
    out = tmp_path / "gen.json"
    rc = evaluate_generation.main([
        "--checkpoint_path", str(tiny_ckpt / "model.pth"), "--prompts",
        str(tiny_ckpt / "prompts.jsonl"), "--sparsity", "0.5", "--calibration", "dense",
        "sequential", "--calib_text", str(text), "--calib_tokens",
        "384", "--max_new_tokens", "8", "--device", "cpu", "--json", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert [r["config"] for r in res] == ["dense", "0.50 uniform magnitude dense",
                                         "0.50 uniform magnitude sequential"]
    assert abs(res[2]["measured_sparsity"] - 0.5) < 0.08
    rc = evaluate_generation.main([
        "--checkpoint_path", str(tiny_ckpt / "model.pth"), "--prompts",
        str(tiny_ckpt / "prompts.jsonl"), "--sparsity", "0.5", "--scoring", "weight",
        "--max_new_tokens", "2", "--device", "cpu", "--quiet"])
    assert rc == 1
