"""Per-request sampling: penalties, filtering, seeded draws, logprobs and incremental stop strings."""

from __future__ import annotations

import pytest
import torch

from mtnlg_ray.serve.sampling import RequestSampler, SamplingParams, StopStrings, sample_batch

PIECES = {0: "fo", 1: "ob", 2: "ar", 3: "x", 4: "\xe2", 5: "\x82\xac"}  # 4 + 5: the bytes of "€"


def fake_decode(ids):
    """Token pieces joined; pieces 4/5 are UTF-8 bytes, so a lone 4 decodes to U+FFFD."""
    raw = "".join(PIECES[i] for i in ids).encode("latin-1")
    return raw.decode("utf-8", errors="replace")


def push_all(stops, ids):
    deltas, hit = [], False
    for t in ids:
        d, hit = stops.push(t)
        deltas.append(d)
        if hit:
            break
    return deltas, hit


def test_stop_string_across_token_boundaries_is_held_back_then_cut():
    stops = StopStrings(fake_decode, ("oba",))
    deltas, hit = push_all(stops, [0, 1, 2, 3])  # "fo" "ob" "ar": "oba" spans three tokens
    assert deltas == ["f", "o", ""] and hit and stops.text == "fo"


def test_held_text_is_released_when_it_stops_matching():
    stops = StopStrings(fake_decode, ("obx", "zz"))
    deltas, hit = push_all(stops, [0, 1, 2])
    assert deltas == ["f", "o", "obar"] and not hit  # "ob" could start "obx" until "ar" came
    assert stops.flush() == ""
    stops = StopStrings(fake_decode, ("arx",))
    assert push_all(stops, [0, 1, 2]) == (["fo", "ob", ""], False)
    assert stops.flush() == "ar"  # the request ended: held text is returned


def test_partial_utf8_character_is_not_emitted():
    stops = StopStrings(fake_decode, ())
    assert stops.push(3) == ("x", False)
    assert stops.push(4) == ("", False)  # half of "€"
    assert stops.push(5) == ("€", False)


def test_incremental_text_equals_decoding_everything_and_reads_short_windows(tiny):
    _, tok = tiny
    text = 'def f(x):\n    """naïve café — 東京 🙂"""\n    return x  # ok\n' * 3
    ids = tok.encode(text)
    windows = []

    def decode(part):
        windows.append(len(part))
        return tok.decode(part)

    for stop in ((), ("zzz",)):  # the hold-back path too ("z" never arrives)
        stops = StopStrings(decode, stop)
        out = "".join(stops.push(t)[0] for t in ids) + stops.flush()
        assert out == tok.decode(ids) == text
    assert max(windows) < 8  # each token decodes a few ids, not the whole output (O(1), not O(n))
    cut = StopStrings(tok.decode, ())
    for t in tok.encode("🙂")[:-1]:  # a request ending inside a character still returns its bytes
        cut.push(t)
    assert cut.flush() == tok.decode(tok.encode("🙂")[:-1])


def test_penalties_and_bias():
    V = 6
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={5: 10.0, 99: 1.0})
    s = RequestSampler(params, prompt=[0], vocab_size=V, device=torch.device("cpu"))
    for t in (1, 1, 2):
        s.observe(t)
    logits = torch.tensor([2.0, -2.0, 1.0, 3.0, 0.0, -1.0])
    out = s.penalize(logits)
    # token 0: prompt only -> repetition 2/2; token 1: -2*2 - 0.5 - 2*0.25; token 2: 1/2 - 0.5 - 0.25
    expected = torch.tensor([1.0, -4.0 - 0.5 - 0.5, 0.5 - 0.75, 3.0, 0.0, 9.0])
    assert torch.allclose(out, expected)
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, 3.0, 0.0, -1.0]))  # input untouched


def test_top_k_top_p_and_seeded_draws():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    s = RequestSampler(SamplingParams(temperature=1.0, top_k=3, seed=5), [1], 100, torch.device("cpu"))
    draws = [sample_batch(logits, [s])[0][0] for _ in range(200)]
    assert set(draws) <= allowed and len(set(draws)) > 1
    top1 = int(logits.argmax())
    s = RequestSampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=5), [1], 100, torch.device("cpu"))
    assert {sample_batch(logits, [s])[0][0] for _ in range(20)} == {top1}
    a = RequestSampler(SamplingParams(temperature=1.0, seed=11), [1], 100, torch.device("cpu"))
    b = RequestSampler(SamplingParams(temperature=1.0, seed=11), [1], 100, torch.device("cpu"))
    other = RequestSampler(SamplingParams(temperature=1.0), [1], 100, torch.device("cpu"))
    seq_a = [sample_batch(logits, [a])[0][0] for _ in range(30)]
    seq_b = [sample_batch(logits.repeat(2, 1), [other, b])[0][1] for _ in range(30)]  # b shares a batch
    assert seq_a == seq_b


def test_logprob_entries():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    s = RequestSampler(SamplingParams(temperature=0, logprobs=2), [0], 4, torch.device("cpu"))
    tokens, entries = sample_batch(logits, [s])
    lp = logits.log_softmax(-1)[0]
    chosen, top = entries[0]
    assert tokens == [3] and chosen == pytest.approx(float(lp[3]))
    assert [t for t, _ in top] == [3, 2] and top[1][1] == pytest.approx(float(lp[2]))


@pytest.mark.parametrize("kwargs, msg", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(stop=("",)), "stop"),
])
def test_invalid_params_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_extreme_values_never_produce_nan_draws():
    logits = torch.tensor([[5.0, 4.0, -3.0, 0.0]])
    tiny_t = RequestSampler(SamplingParams(temperature=1e-40, seed=1), [0], 4, torch.device("cpu"))
    assert tiny_t.params.greedy and sample_batch(logits, [tiny_t])[0] == [0]
    wild = RequestSampler(SamplingParams(temperature=0.5, repetition_penalty=1e-38, seed=1), [0, 1], 4,
                          torch.device("cpu"))  # seen positive logits become inf
    for _ in range(20):
        assert sample_batch(logits, [wild])[0][0] in (0, 1)
