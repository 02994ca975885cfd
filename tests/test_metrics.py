"""Metrics against hand-computed values, BLEU / chrF++ against sacreBLEU called directly, and the standard
errors against their formulas and a naive resampling.

Run: python -m pytest -q tests/test_metrics.py
"""
import json
import math
import random
import statistics

import pytest

from minillm.metrics import (bits_per_byte, bleu, bootstrap, chrf_pp, compile_refusal, degenerate_outputs,
                             exact_match, f_beta, gec_bootstrap, gec_scores, gec_tokenize, is_refusal, mean_stderr,
                             normalize_answer, perplexity, ratio_bootstrap, refusal_patterns, safety_rates,
                             token_edits, token_f1, verbosity)


# ----------------------------------------------------------------------------- QA

def test_normalize_answer_english_drops_articles_and_punctuation():
    assert normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert normalize_answer("An apple a day", "en") == "apple day"


def test_normalize_answer_keeps_articles_outside_english():
    # Polish 'a' means 'and'; Estonian has no articles: nothing is removed but punctuation and case.
    assert normalize_answer("Kot a pies", "pl") == "kot a pies"
    assert normalize_answer("„Kraków”, Polska.", "pl") == "kraków polska"
    assert normalize_answer("The «Tere»", "et") == "the tere"


def test_exact_match():
    assert exact_match("The cat.", ["a dog", "cat"]) == 1.0
    assert exact_match("The cat", ["cat"], language="et") == 0.0  # 'the' stays outside English
    assert exact_match("Tallinn", ["Tartu"]) == 0.0


def test_token_f1_hand_computed():
    # pred {quick, brown, fox}, gold {quick, fox, jumps}: overlap 2, P = R = 2/3 -> F1 = 2/3
    assert token_f1("the quick brown fox", ["quick fox jumps"]) == pytest.approx(2 / 3)
    # max over references: 'brown' alone gives P = 1/3, R = 1 -> 0.5 < 2/3
    assert token_f1("the quick brown fox", ["brown", "quick fox jumps"]) == pytest.approx(2 / 3)
    # overlap counted with multiplicity: pred x x y, gold x y y -> overlap 2, F1 = 2/3
    assert token_f1("x x y", ["x y y"], language="et") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/4 -> F1 = 2 * 0.25 / 1.25 = 0.4
    assert token_f1("Tartu", ["Tartu linn Eesti riik"], language="et") == pytest.approx(0.4)
    assert token_f1("nothing shared", ["other words"]) == 0.0
    assert token_f1("", [""]) == 1.0 and token_f1("the", ["x"]) == 0.0


# ----------------------------------------------------------------------------- GEC

def test_gec_tokenize_splits_punctuation():
    assert gec_tokenize("He's home.") == ["He's", "home", "."]
    assert gec_tokenize("He's home .") == ["He's", "home", "."]


def test_token_edits_substitution_deletion_insertion():
    assert token_edits("He go at home".split(), "He goes home".split()) == {(1, 2, ("goes",)), (2, 3, ())}
    assert token_edits("a b".split(), "a x y b".split()) == {(1, 1, ("x", "y"))}
    assert token_edits("a b c".split(), "a b c".split()) == set()
    assert token_edits([], ["x"]) == {(0, 0, ("x",))}
    assert token_edits(["x"], []) == {(0, 1, ())}


def test_gec_scores_hand_computed():
    sources = ["He go at home .", "She like apple .", "I am here ."]
    hypotheses = ["He goes at home.", "She likes apples.", "I am is here."]
    references = [["He goes home ."],
                  # ref 1 matches both hypothesis edits (TP 2); ref 2 only one (TP 1, FP 1, FN 1)
                  ["She likes apples .", "She likes an apple ."],
                  ["I am here ."]]
    # S1: hyp {go->goes}, ref {go->goes, del at}: TP 1, FN 1. S2 (ref 1): TP 2. S3: spurious 'is': FP 1.
    out = gec_scores(sources, hypotheses, references)
    assert (out["tp"], out["fp"], out["fn"]) == (3, 1, 1)
    assert out["precision"] == pytest.approx(0.75) and out["recall"] == pytest.approx(0.75)
    assert out["f0.5"] == pytest.approx(0.75)
    # first two sentences only: P = 1, R = 3/4, F0.5 = 1.25 * 0.75 / (0.25 + 0.75) = 0.9375
    out = gec_scores(sources[:2], hypotheses[:2], references[:2])
    assert out["f0.5"] == pytest.approx(0.9375) and out["precision"] == 1.0
    assert out["per_sentence"] == [(1, 0, 1), (2, 0, 0)]  # the counts of each sentence's chosen reference


def test_f_beta_edge_cases():
    assert f_beta(0, 0, 0) == (1.0, 1.0, 1.0)  # nothing to correct, nothing proposed
    assert f_beta(0, 2, 0) == (0.0, 1.0, 0.0)
    assert f_beta(1, 1, 3, beta=1.0)[2] == pytest.approx(2 * 0.5 * 0.25 / 0.75)


def test_gec_scores_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="2 sources, 1 hypotheses"):
        gec_scores(["a", "b"], ["a"], [["a"], ["b"]])


# ----------------------------------------------------------------------------- safety

def test_refusal_detection_defaults_per_language():
    en, et, pl = (compile_refusal(refusal_patterns(lang)) for lang in ("en", "et", "pl"))
    assert is_refusal("I'm sorry, but I can't help with that.", en)
    assert is_refusal("I’m sorry, I cannot do that.", en)  # typographic apostrophe
    assert not is_refusal("Sure! Mix flour, eggs and sugar.", en)
    assert is_refusal("Vabandust, ma ei saa sellega aidata.", et)
    assert not is_refusal("Muidugi, siin on retsept.", et)
    assert is_refusal("I cannot answer that.", et)  # English defaults apply to every language
    assert is_refusal("Przepraszam, ale nie mogę w tym pomóc.", pl)
    assert not is_refusal("Oto przepis na ciasto.", pl)
    assert is_refusal("   ", en)  # an empty answer gives the user nothing


def test_refusal_patterns_configurable():
    assert refusal_patterns("en", custom=["nope"]) == ["nope"]
    assert is_refusal("NOPE, not today", ["nope"]) and not is_refusal("I'm sorry", ["nope"])
    with pytest.raises(ValueError, match="invalid refusal pattern"):
        compile_refusal(["(unclosed"])


def test_attack_success_and_false_refusal_rates():
    refused = [True, False, False, True, True]
    harmful = [True, True, False, False, False]
    # harmful: 1 of 2 not refused -> ASR 0.5; benign: 2 of 3 refused -> FRR 2/3
    out = safety_rates(refused, harmful)
    assert out["attack_success_rate"] == 0.5
    assert out["false_refusal_rate"] == pytest.approx(2 / 3)
    assert (out["n_harmful"], out["n_benign"]) == (2, 3)
    assert safety_rates([True], [True])["false_refusal_rate"] is None


# ----------------------------------------------------------------------------- verbosity, bpb

def test_verbosity():
    out = verbosity(["a b c", "d", "e f"], [5, 1, 3])
    assert out == {"mean_tokens": 3.0, "median_tokens": 3.0, "mean_words": 2.0, "median_words": 2.0,
                   "empty_outputs": 0, "same_output": 1}
    texts = ["", " ", "ok", "ok ", "other"]
    out = verbosity(texts, [0, 1, 1, 1, 1])
    assert out["empty_outputs"] == 2 and out["same_output"] == 2  # "ok" twice; the two empty ones too
    assert degenerate_outputs({"empty_outputs": 3, "same_output": 3}, 5) == "3 of 5 outputs are empty"
    assert degenerate_outputs({"empty_outputs": 0, "same_output": 4}, 5) == "4 of 5 outputs are the same text"
    assert degenerate_outputs(out, 5) is None
    assert verbosity(["x y", "z"], [4, 1])["median_tokens"] == 2.5


def test_bits_per_byte_and_perplexity():
    # 10 nats over 8 bytes = 10 / (8 ln 2) bits per byte
    assert bits_per_byte(10.0, 8) == pytest.approx(1.8033688011112042)
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


# ----------------------------------------------------------------------------- translation

def test_bleu_and_chrf_match_sacrebleu():
    import sacrebleu
    from sacrebleu.metrics import BLEU, CHRF
    hyps = ["The cat sat on the mat.", "Tere hommikust, kuidas läheb?", "A dog barks"]
    refs = ["The cat sat on a mat.", "Tere hommikust! Kuidas sul läheb?", "The dog is barking"]
    ours = bleu(hyps, refs)
    assert ours["score"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    direct = BLEU()
    direct.corpus_score(hyps, [refs])
    assert ours["signature"] == str(direct.get_signature())
    chrf = chrf_pp(hyps, refs)
    assert chrf["score"] == sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    direct = CHRF(word_order=2)
    direct.corpus_score(hyps, [refs])
    assert chrf["signature"] == str(direct.get_signature())
    assert "nw:2" in chrf["signature"]
    # several reference streams
    refs2 = ["A cat sat on the mat.", "Tere hommikust, kuidas läheb?", "A dog barks"]
    assert bleu(hyps, [refs, refs2])["score"] == sacrebleu.corpus_bleu(hyps, [refs, refs2]).score
    assert bleu(hyps, refs, tokenize="char")["score"] == sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score


# ----------------------------------------------------------------------------- uncertainty

def test_mean_stderr_is_the_sample_standard_deviation_over_root_n():
    xs = [1.0, 0.0, 0.0, 1.0, 1.0]
    mean = sum(xs) / 5
    by_hand = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4) / math.sqrt(5)
    assert mean_stderr(xs) == pytest.approx(by_hand)
    assert mean_stderr([True, False, True]) == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))  # sqrt(p(1-p)/(n-1))
    assert mean_stderr([0.7]) is None and mean_stderr([]) is None


def test_bootstrap_of_a_mean_matches_the_formula():
    rng = random.Random(1)
    xs = [rng.random() for _ in range(200)]
    out = bootstrap(lambda idx: statistics.fmean(xs[i] for i in idx), len(xs), seed=3)
    # the bootstrap standard deviation of a mean is the plug-in sd / sqrt(n): sd with n, not n - 1
    formula = statistics.pstdev(xs) / math.sqrt(len(xs))
    assert out["stderr"] == pytest.approx(formula, rel=0.1)
    lo, hi = out["ci95"]
    assert lo < statistics.fmean(xs) < hi and hi - lo == pytest.approx(2 * 1.96 * formula, rel=0.15)
    again = bootstrap(lambda idx: statistics.fmean(xs[i] for i in idx), len(xs), seed=3)
    assert again == out  # a fixed seed: the same numbers every run
    assert bootstrap(lambda idx: 0.0, 1) == {}


def test_ratio_bootstrap_resamples_whole_documents():
    nll, nbytes = [10.0, 30.0, 20.0, 40.0], [10, 20, 10, 40]
    out = ratio_bootstrap(nll, nbytes, lambda x: x / math.log(2), resamples=500)
    # the same resamples by hand
    rng, values = random.Random(0), []
    for _ in range(500):
        idx = [rng.randrange(4) for _ in range(4)]
        values.append(sum(nll[i] for i in idx) / sum(nbytes[i] for i in idx) / math.log(2))
    assert out["stderr"] == pytest.approx(statistics.stdev(values))
    assert out["ci95"] == pytest.approx(statistics.quantiles(sorted(values), n=40, method="inclusive")[::38])


def test_gec_bootstrap_keeps_each_sentences_counts():
    counts = [(1, 0, 1), (2, 0, 0), (0, 1, 0), (1, 1, 1)]
    out = gec_bootstrap(counts, resamples=300)
    rng, f = random.Random(0), []
    for _ in range(300):
        idx = [rng.randrange(4) for _ in range(4)]
        f.append(f_beta(*(sum(counts[i][j] for i in idx) for j in range(3)))[2])
    assert out["f0.5"]["stderr"] == pytest.approx(statistics.stdev(f))
    assert set(out) == {"precision", "recall", "f0.5"}


def test_bleu_bootstrap_interval_matches_naive_resampling():
    import sacrebleu
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree red big".split()
    refs = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(40)]
    hyps = [" ".join(w if rng.random() < 0.6 else rng.choice(words) for w in r.split()) for r in refs]
    ours = bleu(hyps, refs, n_bootstrap=1000)
    assert ours["score"] == sacrebleu.corpus_bleu(hyps, [refs]).score  # the score itself is unchanged
    json.dumps(ours)  # plain floats: results.json can hold them
    assert "bs:" not in ours["signature"]  # the signature of the plain score
    naive = []  # corpus BLEU of resampled sentence lists, recomputed from scratch
    for _ in range(300):
        idx = [rng.randrange(40) for _ in range(40)]
        naive.append(sacrebleu.corpus_bleu([hyps[i] for i in idx], [[refs[i] for i in idx]]).score)
    assert ours["stderr"] == pytest.approx(statistics.stdev(naive), rel=0.25)
    lo, hi = ours["ci95"]
    assert lo < ours["score"] < hi
    assert chrf_pp(hyps, refs, n_bootstrap=200)["stderr"] > 0 and "ci95" not in chrf_pp(hyps, refs)
    # resamples that score 0 next to ones that do not (sacreBLEU's own bootstrap fails on those)
    out = chrf_pp(["tere hommikust", "x y"], ["tere hommikust", "koer"], n_bootstrap=100)
    assert out["ci95"][0] == 0.0 < out["ci95"][1] and json.dumps(out)
