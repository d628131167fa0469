"""`adaptkit tokensurgeon`: a model given another model's tokenizer, against mergekit-tokensurgeon 0.1.5 on
the same tiny models (every tensor's bytes and config.json), each approximation's math written out, the
vocabulary rules, and bad input in one line.

The pair: `model`, a tiny Llama (width 64) with a SentencePiece-style BPE tokenizer (`▁` word starts, a
LlamaTokenizer) plus three byte tokens (<0x7E>, <0x40>, <0x23>) for characters it lacks; `donor`, a tiny
Llama of another width (48) and its own weights with a byte-level BPE tokenizer (`Ġ` word starts, a
GPT2Tokenizer) of 400 tokens, tied embeddings (no lm_head stored). Each is also saved in bfloat16.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from adaptkit.errors import AdaptkitError
from adaptkit.merge import token_approx as ta
from adaptkit.merge.token_keys import Vocabulary, byte_match, prefix_match
from adaptkit.merge.tokensurgeon import SurgeryOptions, surgery
from builders import state, tiny_llama
from fake_gpu import fake_cuda
from hostile import assert_one_line_error, run_cli

TEXT = ["the cat sat on the mat and the dog ran in the park " * 3,
        "merging models is a way to combine what several fine tunes learned without training again",
        "tokenizers split words into pieces; byte level pieces cover every string",
        "a donor tokenizer brings its vocabulary and the surgeon approximates new rows"] * 20
BYTES = ["<0x7E>", "<0x40>", "<0x23>"]  # ~ @ #


def _tokenizers():
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import GPT2TokenizerFast, LlamaTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(TEXT, vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    spec = json.loads(sp._tokenizer.to_str())
    for token in BYTES:  # byte tokens for characters the corpus lacks (reachable by no merge, as in real vocabularies)
        spec["model"]["vocab"][token] = len(spec["model"]["vocab"])
    from tokenizers import Tokenizer

    model = LlamaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                               bos_token="<s>", eos_token="</s>")
    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(TEXT, vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"])
    donor = GPT2TokenizerFast(tokenizer_object=bl._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                              unk_token="<|endoftext|>", pad_token="<|pad|>")
    return model, donor


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("surgery")
    model_tok, donor_tok = _tokenizers()
    model = tiny_llama(0, vocab_size=len(model_tok), hidden_size=64, intermediate_size=96, bos_token_id=1,
                       eos_token_id=2)
    donor = tiny_llama(1, vocab_size=len(donor_tok), hidden_size=48, intermediate_size=96, bos_token_id=0,
                       eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)
    for name, net, tok in (("model", model, model_tok), ("donor", donor, donor_tok)):
        # float32, bfloat16, and bfloat16's values held in float32 ("-bf16up")
        for suffix, dtype in (("", torch.float32), ("-bf16", torch.bfloat16), ("-bf16up", torch.float32)):
            net.to(dtype).save_pretrained(root / (name + suffix))
            tok.save_pretrained(root / (name + suffix))
    return root


def mergekit(pair, out, model="model", donor="donor", *args):
    """mergekit-tokensurgeon (its click command, in process) of `model` and `donor` into `out`."""
    from mergekit.scripts.tokensurgeon import main

    main.main([str(pair / model), str(pair / donor), str(out), *map(str, args)], standalone_mode=False)
    return state(out)


def assert_same(ours, theirs, atol: float = 0):
    got, expected = state(ours), state(theirs)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())


CASES = {  # id: (our options, mergekit's command line)
    "omp": ({"k": 8}, ["-k", 8]),
    "common_interpolation": ({"method": "common_interpolation", "k": 8}, ["-a", "common_interpolation", "-k", 8]),
    "common_interpolation-cosine": ({"method": "common_interpolation", "k": 8, "cosine": True},
                                    ["-a", "common_interpolation", "-k", 8, "-c"]),
    "barycentric": ({"method": "common_interpolation", "k": 8, "weight_scheme": "barycentric"},
                    ["-a", "common_interpolation", "-k", 8, "-w", "barycentric"]),
    "least_squares": ({"method": "common_interpolation", "k": 8, "weight_scheme": "least_squares"},
                      ["-a", "common_interpolation", "-k", 8, "-w", "least_squares"]),
    "subword": ({"method": "subword"}, ["-a", "subword"]),
    "subword-sum": ({"method": "subword", "subword_method": "sum"}, ["-a", "subword", "-s", "sum"]),
    "subword-first_last": ({"method": "subword", "subword_method": "first_last"}, ["-a", "subword", "-s", "first_last"]),
    "mean": ({"method": "mean"}, ["-a", "mean"]),
    "zero": ({"method": "zero"}, ["-a", "zero"]),
    "landmark_pca": ({"method": "landmark_pca"}, ["-a", "landmark_pca", "--random-seed", 0]),
    # mergekit's -pm lm_head is a prefix match in the embedding (its embed and lm_head are swapped)
    "matches": ({"k": 8, "byte_match": "yes", "prefix_match": "embed"}, ["-k", 8, "-bm", "yes", "-pm", "lm_head"]),
    "matches-head": ({"k": 8, "byte_match": "lm_head", "prefix_match": "lm_head"},
                     ["-k", 8, "-bm", "embed", "-pm", "embed"]),
    "magikarp": ({"k": 8, "magikarp": True}, ["-k", 8, "--magikarp"]),
    "scaled": ({"k": 8, "new_vocab_scale": 0.5, "batch_size": 7}, ["-k", 8, "-nvs", 0.5, "--batch-size", 7]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_same_options_give_mergekits_bytes(pair, tmp_path, case):
    ours, theirs = CASES[case]
    report = surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "ours", SurgeryOptions(**ours), seed=0,
                     card=False)
    mergekit(pair, tmp_path / "mk", "model", "donor", *theirs)
    if case.startswith("matches"):  # the matches happened, in the matrix the option names
        embed, head = report["tensors"]["model.embed_tokens.weight"], report["tensors"]["lm_head.weight"]
        on, off = (head, embed) if case.endswith("head") else (embed, head)
        assert on["byte"] == 3 and on["prefix"] > 10 and off["prefix"] == 0
    # batched least squares (LAPACK) give the last bits by the batch's order, mergekit's is its hash order, and its own
    # float32 result moves from call to call (max |Δ| up to 7.3e-7 in 14 runs, over 1e-6 in 1 of 2 CI runs)
    assert_same(tmp_path / "ours", tmp_path / "mk", atol=1e-5 if case in ("barycentric", "least_squares") else 0)


@pytest.mark.parametrize("case", ["omp", "subword", "mean", "landmark_pca"])
def test_bfloat16_models_give_mergekits_bytes(pair, tmp_path, case):
    ours, theirs = CASES[case]
    surgery(str(pair / "model-bf16"), str(pair / "donor-bf16"), tmp_path / "ours", SurgeryOptions(**ours), seed=0,
            card=False)
    mergekit(pair, tmp_path / "mk", "model-bf16", "donor-bf16", *theirs)
    assert_same(tmp_path / "ours", tmp_path / "mk")
    assert state(tmp_path / "ours")["model.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["common_interpolation", "barycentric"])
def test_common_interpolation_of_bfloat16_models_is_mergekits_float32_rounded(pair, tmp_path, case):
    """mergekit 0.1.5's common_interpolation fails on bfloat16 models (its weights stay bfloat16 and meet float32
    rows in one bmm); adaptkit weighs in float32: mergekit's result on the same values held in float32, rounded
    once to bfloat16."""
    ours, theirs = CASES[case]
    surgery(str(pair / "model-bf16"), str(pair / "donor-bf16"), tmp_path / "ours", SurgeryOptions(**ours), card=False)
    expected = mergekit(pair, tmp_path / "mk", "model-bf16up", "donor-bf16up", *theirs)
    got = state(tmp_path / "ours")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name], expected[name].to(torch.bfloat16), rtol=0,
                                   atol=0 if case == "common_interpolation" else 1e-3, msg=name)


def _rows(tensor):
    """The rows as a sorted list of tuples (which token got which draw aside)."""
    return sorted(map(tuple, tensor.tolist()))


@pytest.mark.parametrize("method", ["randn", "john_hewitt"])
def test_random_methods_draw_mergekits_numbers_under_the_same_seed(pair, tmp_path, method):
    """The same seed, the same draws; mergekit hands them out in its tokenizer's hash order (which changes from
    run to run), adaptkit in donor id order: the same rows, in another order."""
    surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "ours", SurgeryOptions(method=method), seed=5,
            card=False)
    theirs = mergekit(pair, tmp_path / "mk", "model", "donor", "-a", method, "--random-seed", 5)
    ours = state(tmp_path / "ours")
    kept = _kept_ids(pair)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        new = [i for i in range(ours[name].shape[0]) if i not in kept]
        assert _rows(ours[name][new]) == _rows(theirs[name][new])
    # and adaptkit's order: the first drawn row is the lowest new id's
    generator = torch.Generator().manual_seed(5)
    if method == "randn":
        assert torch.equal(ours["model.embed_tokens.weight"][min(new)], torch.randn(len(new), 64, generator=generator)[0])


def _kept_ids(pair) -> set[int]:
    from transformers import AutoTokenizer

    mine = Vocabulary.of(AutoTokenizer.from_pretrained(str(pair / "model")))
    theirs = Vocabulary.of(AutoTokenizer.from_pretrained(str(pair / "donor")))
    return {i for i, key in theirs.keys.items() if key in mine.ids}


def test_noise_is_seeded_draws_after_each_batch(pair, tmp_path):
    """--new-vocab-noise σ adds σ·z, z the seed's N(0, 1) draws for each batch in donor id order, then the scale."""
    plain, noisy = SurgeryOptions(k=8), SurgeryOptions(k=8, new_vocab_noise=0.1, new_vocab_scale=2.0)
    surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "plain", plain, card=False)
    report = surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "noisy", noisy, seed=3, card=False)
    a, b = state(tmp_path / "plain"), state(tmp_path / "noisy")
    new = sorted(set(range(400)) - _kept_ids(pair))
    z = torch.Generator().manual_seed(3)
    embed_noise = torch.randn(len(new), 64, generator=z)
    expected = (a["model.embed_tokens.weight"][new] + embed_noise * 0.1) * 2.0
    torch.testing.assert_close(b["model.embed_tokens.weight"][new], expected, rtol=0, atol=1e-6)
    head_noise = torch.randn(len(new), 64, generator=z)  # the head's batch comes after the embedding's
    torch.testing.assert_close(b["lm_head.weight"][new], (a["lm_head.weight"][new] + head_noise * 0.1) * 2.0,
                               rtol=0, atol=1e-6)
    assert report["seed"] == 3 and report["tensors"]["lm_head.weight"]["approximated"] == len(new)


def test_a_scale_of_zero_zeroes_the_approximated_rows(pair, tmp_path):
    """mergekit reads --new-vocab-scale 0 as no scale; a 0 given is a 0 here."""
    surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "out", SurgeryOptions(k=8, new_vocab_scale=0.0),
            card=False)
    new = sorted(set(range(400)) - _kept_ids(pair))
    assert not state(tmp_path / "out")["model.embed_tokens.weight"][new].any()


def test_a_donor_that_is_the_model_rotated_gives_back_the_models_rows(tmp_path, pair):
    """The donor's embedding is the model's times an orthogonal Q (the same tokens, 12 of them missing from
    the model): omp with k = width, least_squares, landmark_pca and stb then recover the missing rows."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pair / "model"))
    full = tiny_llama(0, vocab_size=len(tok), hidden_size=16, intermediate_size=32, tie_word_embeddings=True)
    truth = full.model.embed_tokens.weight.detach().clone()
    q = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))[0]
    full.save_pretrained(tmp_path / "donor")
    tok.save_pretrained(tmp_path / "donor")
    save_file({"model.embed_tokens.weight": (truth @ q).contiguous()}, tmp_path / "rot.safetensors")
    (tmp_path / "donor" / "model.safetensors").unlink()
    (tmp_path / "rot.safetensors").rename(tmp_path / "donor" / "model.safetensors")
    missing = [t for t in tok.get_vocab() if not t.startswith("<")][:12]
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    keep = sorted((t for t in vocab if t not in missing), key=vocab.get)
    spec["model"]["vocab"], spec["model"]["merges"] = {t: i for i, t in enumerate(keep)}, []
    from tokenizers import Tokenizer
    from transformers import LlamaTokenizerFast

    small = LlamaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                               bos_token="<s>", eos_token="</s>")
    old = [tok.get_vocab()[t] for t in keep]
    model = tiny_llama(0, vocab_size=len(keep), hidden_size=16, intermediate_size=32, tie_word_embeddings=True)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(truth[old])
    model.save_pretrained(tmp_path / "model")
    small.save_pretrained(tmp_path / "model")
    ids = [tok.get_vocab()[t] for t in missing]
    for i, options in enumerate([SurgeryOptions(k=16), SurgeryOptions(method="common_interpolation", k=16,
                                                                     weight_scheme="least_squares"),
                                 SurgeryOptions(method="landmark_pca"), SurgeryOptions(method="stb", k=16)]):
        surgery(str(tmp_path / "model"), str(tmp_path / "donor"), tmp_path / f"out{i}", options, seed=0, card=False)
        got = state(tmp_path / f"out{i}")["model.embed_tokens.weight"]
        torch.testing.assert_close(got[ids], truth[ids], rtol=0, atol=2e-4, msg=options.method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mp_rope_gives_mergekits_numbers(dtype):
    """mp_rope against mergekit's batch_mp_rope on the same tensors (its script reads config.rope_theta, which
    transformers 5 configs no longer have, and fails): bfloat16 bit for bit; float32 to 1e-5 (mergekit's own
    float32 result changes from call to call in its least squares' last bits: up to 3.6e-7 in 10 runs)."""
    from mergekit.tokensurgeon.omp import batch_mp_rope

    g = torch.Generator().manual_seed(0)
    targets, a, b = (torch.randn(shape, generator=g).to(dtype) for shape in ((37, 48), (200, 48), (200, 64)))
    expected = batch_mp_rope(targets, a, b, k=8, num_heads_a=4, num_heads_b=2, a_rope_base=1e4, b_rope_base=5e5)[2]
    got = ta.mp_rope(targets, a, b, 8, (4, 2), (1e4, 5e5))
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)


def test_rope_rotates_each_head_pair_by_position_times_frequency():
    """RoPE written out: pair (xᵢ, xᵢ₊ₕ/₂) of each head turned by p·base^(−2i/h); rope_position finds p back."""
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    p = torch.tensor([[3.0]])
    rotated = ta.rope(x, p, heads=2, base=100.0)
    for head in range(2):
        for i in range(2):
            angle = 3.0 * 100.0 ** (-2 * i / 4)
            u, v = x[0, head * 4 + i].item(), x[0, head * 4 + i + 2].item()
            assert rotated[0, head * 4 + i].item() == pytest.approx(u * math.cos(angle) - v * math.sin(angle), abs=1e-6)
            assert rotated[0, head * 4 + i + 2].item() == pytest.approx(v * math.cos(angle) + u * math.sin(angle),
                                                                        abs=1e-6)
    assert ta.rope_position(x, rotated, heads=2, base=100.0).item() == pytest.approx(3.0, rel=0.2)


def test_mp_rope_runs_on_rope_models_and_refuses_others(pair, tmp_path):
    report = surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "out", SurgeryOptions(method="mp_rope", k=8),
                     card=False)
    assert report["tensors"]["lm_head.weight"]["approximated"] == 400 - len(_kept_ids(pair))
    shutil.copytree(pair / "donor", tmp_path / "norope")
    config = json.loads((tmp_path / "norope" / "config.json").read_text())
    config.pop("rope_parameters", None), config.pop("rope_theta", None)
    (tmp_path / "norope" / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdaptkitError, match="mp_rope needs a RoPE model: .*norope's config.json has no rope_theta"):
        surgery(str(pair / "model"), str(tmp_path / "norope"), tmp_path / "out2", SurgeryOptions(method="mp_rope"))
    assert not (tmp_path / "out2").exists()


DEVICE_CASES = {**{case: options for case, (options, _) in CASES.items()}, "stb": {"method": "stb", "k": 8},
                "mp_rope": {"method": "mp_rope", "k": 8}, "randn": {"method": "randn"},
                "john_hewitt": {"method": "john_hewitt"}, "noise": {"k": 8, "new_vocab_noise": 0.1, "batch_size": 50}}


@pytest.mark.parametrize("suffix", ["", "-bf16"])
@pytest.mark.parametrize("case", DEVICE_CASES)
def test_on_a_device_every_method_gives_the_cpu_rows(pair, tmp_path, case, suffix):
    """`--device`: the approximations on a stand-in GPU (tests/fake_gpu.py: CPU numbers, CUDA's placement
    rules) give the CPU run's bytes; the random draws stay on the CPU. Batched least squares (LAPACK) vary in
    their last bits from one float32 run to the next on the CPU alone (by the buffers' alignment, at any
    thread count): those are compared to 1e-6, and where rounded to bfloat16 (stb, 1.2e-4 seen near 0) an
    entry may be one step of bfloat16 or 2⁻¹² apart."""
    options = SurgeryOptions(**DEVICE_CASES[case])
    inputs = str(pair / f"model{suffix}"), str(pair / f"donor{suffix}")
    surgery(*inputs, tmp_path / "cpu", options, seed=3, card=False)
    with fake_cuda():
        report = surgery(*inputs, tmp_path / "gpu", options, seed=3, card=False, device="cuda")
    assert report["device"] == "cuda:0"
    lapack = case in ("barycentric", "least_squares", "stb")
    if not (lapack and suffix):
        return assert_same(tmp_path / "gpu", tmp_path / "cpu", atol=1e-6 if lapack else 0)
    cpu, gpu = state(tmp_path / "cpu"), state(tmp_path / "gpu")
    for name in cpu:
        steps = (gpu[name].view(torch.int16).int() - cpu[name].view(torch.int16).int()).abs()
        assert ((steps <= 1) | ((gpu[name].float() - cpu[name].float()).abs() <= 2**-12)).all(), name


def test_a_device_this_machine_lacks_is_one_line(pair, tmp_path):
    result = run_cli("tokensurgeon", pair / "model", pair / "donor", "-o", tmp_path / "out", "--device", "cuda")
    assert_one_line_error(result, "--device cuda: this machine has no CUDA GPU that torch can use")
    assert not (tmp_path / "out").exists()


def test_stb_runs_on_bfloat16_models(pair, tmp_path):
    """Its rows are computed in float32 and rounded once to the model's dtype (the output's rows were float32
    and the run stopped on writing them into the bfloat16 matrix)."""
    report = surgery(str(pair / "model-bf16"), str(pair / "donor-bf16"), tmp_path / "out",
                     SurgeryOptions(method="stb", k=8), card=False)
    assert report["tensors"]["lm_head.weight"]["approximated"] == 400 - len(_kept_ids(pair))
    assert all(t.dtype == torch.bfloat16 for n, t in state(tmp_path / "out").items() if "embed" in n or "lm_head" in n)


def test_the_models_own_tokenizer_gives_the_model_back(pair, tmp_path):
    report = surgery(str(pair / "model"), str(pair / "model"), tmp_path / "out", card=False)
    assert report["tensors"]["lm_head.weight"]["approximated"] == 0
    got, expected = state(tmp_path / "out"), state(pair / "model")
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


def test_omp_recovers_a_sparse_combination_and_its_coefficients():
    """y = 2·p₃ − 0.5·p₇: OMP with k = 2 picks {3, 7} and solves the coefficients exactly (points: the unit
    axes and ten short random ones, so that the greedy choice is the right one)."""
    points = torch.cat([torch.eye(10), 0.05 * torch.randn(10, 10, generator=torch.Generator().manual_seed(1))])
    y = (2 * points[3] - 0.5 * points[7]).unsqueeze(0)
    indices, coefficients = ta.omp(y, points, 2)
    found = dict(zip(indices[0].tolist(), coefficients[0].tolist()))
    assert found.keys() == {3, 7}
    assert found[3] == pytest.approx(2, abs=1e-5) and found[7] == pytest.approx(-0.5, abs=1e-5)


def test_common_interpolation_weights_written_out():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [10.0, 10.0]])
    y = torch.tensor([[0.0, 1.0]])
    indices, weights = ta.common_interpolation(y, points, 3)
    assert indices[0].tolist() == [0, 2, 1]  # distances 1, 3, √10
    inverse = torch.tensor([1 / 1, 1 / 3, 1 / 10 ** 0.5])
    torch.testing.assert_close(weights[0], inverse / inverse.sum())
    _, bary = ta.common_interpolation(y, points, 3, scheme="barycentric")
    assert bary.sum().item() == pytest.approx(1, abs=1e-5)  # affine weights: Σw = 1, and y = Σ wᵢ pᵢ exactly here
    torch.testing.assert_close(bary[0] @ points[indices[0]], y[0], rtol=0, atol=1e-5)


def test_subword_weighted_mean_weighs_the_piece_that_matters_most():
    """weighted_mean: weights 1..n rising toward the last piece for an input embedding, toward the first for
    an LM head (first_last's choice; mergekit 0.1.5 has them the other way round, against its comment)."""
    embed = torch.tensor([[1.0], [10.0], [100.0]])
    texts = ["abc"]

    def split(_):
        return [0, 1, 2]

    assert ta.subword(embed, texts, split, "weighted_mean", lm_head=False)[0, 0] == pytest.approx((1 + 20 + 300) / 6)
    assert ta.subword(embed, texts, split, "weighted_mean", lm_head=True)[0, 0] == pytest.approx((3 + 20 + 100) / 6)
    assert ta.subword(embed, texts, split, "first_last", lm_head=False)[0, 0] == 100
    assert ta.subword(embed, texts, split, "first_last", lm_head=True)[0, 0] == 1


def test_magikarp_drops_unused_and_untrained_rows():
    """Rows no token has are unused; a token close to their mean (cosine > 0.5 and the 99th percentile) or, with a
    head, of an input norm under the 1st percentile is not well trained."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(200, 8, generator=g)
    embed[199] = torch.tensor([5.0] * 8)  # unused (no token)
    embed[7] = torch.tensor([5.1] * 8)  # a token that looks like the unused row
    embed[9] = embed[9] * 1e-3  # a token that never moved from near zero
    vocab = {f"t{i}": i for i in range(199)}
    texts = {k: k for k in vocab}
    good = ta.well_trained(vocab, texts, embed, lm_head=embed.clone())
    assert "t7" not in good and "t9" not in good and len(good) == 199 - 2 - 1  # and the lowest-norm one is t9
    assert "t7" not in ta.well_trained(vocab, texts, embed, lm_head=None)


def test_vocabulary_keys(pair):
    from transformers import AutoTokenizer

    donor = Vocabulary.of(AutoTokenizer.from_pretrained(str(pair / "donor")))
    model = Vocabulary.of(AutoTokenizer.from_pretrained(str(pair / "model")))
    assert ("word_start", "the") in donor.ids and ("word_start", "the") in model.ids  # Ġthe and ▁the
    assert donor.keys[0] == ("special", "bos_token") == model.keys[1]  # <|endoftext|> and <s>: BOS by role
    assert byte_match("~", model.ids) == model.ids["<0x7E>"] and byte_match("<0x7E>", {"~": 5}) == 5
    assert byte_match(("word_start", "~"), model.ids) is None
    assert prefix_match(("word_start", "thexyz"), model.ids) == model.ids[("word_start", "the")]
    assert prefix_match(("special", "pad_token"), model.ids) is None


def test_additional_special_tokens_keep_their_own_rows(tmp_path):
    """Under transformers 4 mergekit gives every additional special token one key, so one survives (by hash
    order) and the others get zero rows; each is keyed by its text here, under any version."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [])), unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    vocab = Vocabulary.of(tok)
    assert vocab.ids["<|im_start|>"] == 2 and vocab.ids["<|im_end|>"] == 3

    class Older:  # transformers 4's tokenizers list them in special_tokens_map
        special_tokens_map = {"unk_token": "<unk>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}

        def get_vocab(self):
            return tok.get_vocab()

    assert Vocabulary.of(Older()).ids == vocab.ids


def test_the_output_loads_and_runs_with_the_donors_tokenizer(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit.cli import cli
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["-q", "tokensurgeon", str(pair / "model"), str(pair / "donor"), "-o",
                                      str(tmp_path / "out"), "-k", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["vocab_size"] == 400 and report["model_vocab_size"] == 179 and report["method"] == "omp"
    counts = report["tensors"]["model.embed_tokens.weight"]
    assert counts["exact"] + counts["approximated"] == 400 and counts["byte"] == counts["prefix"] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "tokensurgeon" in card and "| `lm_head.weight` |" in card
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 400)
    assert model.config.pad_token_id == 1 and model.config.bos_token_id == 0


def test_a_model_with_an_adapter_is_the_merged_model(pair, tmp_path):
    """MODEL+LORA: the adapter's ΔW is in every tensor it changes (added in float32, rounded once), as
    `adaptkit merge` would merge it; the vocabulary rows come from the merged embedding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(pair / "model"))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(pair / "model")).save_pretrained(tmp_path / "merged")
    surgery(f"{pair / 'model'}+{tmp_path / 'lora'}", str(pair / "donor"), tmp_path / "ours", SurgeryOptions(k=8),
            card=False)
    surgery(str(tmp_path / "merged"), str(pair / "donor"), tmp_path / "theirs", SurgeryOptions(k=8), card=False)
    got, expected = state(tmp_path / "ours"), state(tmp_path / "theirs")
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           state(pair / "model")["model.layers.0.self_attn.q_proj.weight"])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_dry_run_counts_what_the_run_does_and_writes_nothing(pair, tmp_path):
    options = SurgeryOptions(k=8, byte_match="yes", prefix_match="lm_head", magikarp=True)
    planned = surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "out", options, dry_run=True)
    assert not (tmp_path / "out").exists() and planned["dry_run"]
    done = surgery(str(pair / "model"), str(pair / "donor"), tmp_path / "out", options, card=False)
    assert planned["tensors"] == done["tensors"] and planned["vocab_size"] == done["vocab_size"] == 400
    result = run_cli("tokensurgeon", pair / "model", pair / "donor", "-o", tmp_path / "none", "--dry-run")
    assert result.exit_code == 0 and "to approximate by omp" in result.stdout and not (tmp_path / "none").exists()


@pytest.mark.parametrize("args,fragment", [
    (["-k", "500"], "k 500 is more than the"),
    # the donor's width is 48: past it OMP's Gram-Schmidt divides by eps, and mergekit writes rows of ~1e6
    ([], "k 64 is more than the width 48 of the space OMP picks in"),
    (["--method", "stb"], "k 64 is more than the width 48 of the space OMP picks in"),
    (["--method", "nope"], "'nope' is not one of"),
    (["--random-seed", "1"], "no such option '--random-seed' (mergekit's): here --seed"),
])
def test_bad_options_are_one_line(pair, tmp_path, args, fragment):
    assert_one_line_error(run_cli("tokensurgeon", pair / "model", pair / "donor", "-o", tmp_path / "out", *args),
                          fragment)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line(pair, tmp_path):
    bare = tmp_path / "bare"
    tiny_llama(0).save_pretrained(bare)  # no tokenizer
    assert_one_line_error(run_cli("tokensurgeon", bare, pair / "donor", "-o", tmp_path / "out"), "has no tokenizer files")
    assert_one_line_error(run_cli("tokensurgeon", tmp_path / "missing", pair / "donor", "-o", tmp_path / "out"),
                          "missing")
    (tmp_path / "out").mkdir()
    assert_one_line_error(run_cli("tokensurgeon", pair / "model", pair / "donor", "-o", tmp_path / "out"), "--force")
    assert list((tmp_path / "out").iterdir()) == []
    broken = tmp_path / "broken"
    shutil.copytree(pair / "donor", broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')  # JSON, not a tokenizer
    assert_one_line_error(run_cli("tokensurgeon", pair / "model", broken, "-o", tmp_path / "out2"),
                          "cannot load its tokenizer (KeyError: 'added_tokens')")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(AdaptkitError, match="unknown subword method"):
        SurgeryOptions(subword_method="median")
