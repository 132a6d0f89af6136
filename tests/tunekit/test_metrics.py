"""Evaluation: the task metrics agree with their reference libraries, and batched greedy generation
returns what one-prompt-at-a-time greedy decoding gives."""

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from tunekit.chat import end_of_turn_marker, render, resolve_chat_template
from tunekit.generate import Prompt, generate, generate_samples, prompts_from_conversations, score_generations, stop_token_ids
from tunekit.metrics import bleu, chrf, exact_match, generation_metrics, rouge, rouge_l
from tunekit.models import load_causal_lm, load_tokenizer

PREDICTIONS = [
    "The order ships on Monday.",
    "the cat sat on the mat",
    '{"status": "refunded", "amount": 12.5}',
    "Café crème costs 3 €, naïve price",
    "",
    "completely different words here",
]
REFERENCES = [
    "The order will ship on Monday.",
    "the cat is sitting on the mat",
    '{"status": "refunded", "amount": 12.5}',
    "Café crème costs 4 €, a naïve price",
    "an answer was expected",
    "nothing in common at all",
]


# ---------------------------------------------------------------- metrics


def test_bleu_is_sacrebleu_corpus_bleu():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert 0 < expected < 100
    assert bleu(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-9)
    # Corpus BLEU is not the mean of sentence BLEUs: pooling the n-gram counts is what sacrebleu does.
    mean_of_sentences = sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDICTIONS, REFERENCES)) / len(REFERENCES)
    assert bleu(PREDICTIONS, REFERENCES) != pytest.approx(mean_of_sentences, abs=0.5)


def test_bleu_known_values_and_edge_cases():
    text = "the quick brown fox jumps over the lazy dog"
    assert bleu([text], [text]) == pytest.approx(100.0)
    assert bleu(["alpha beta gamma delta epsilon"], [text]) == 0.0
    # Unicode is scored like any other text, and an empty prediction scores 0, not an error.
    unicode = "Grüße aus Köln: naïve café, déjà vu — 東京 ok"
    assert bleu([unicode], [unicode]) == pytest.approx(100.0)
    assert bleu([""], [text]) == 0.0
    assert bleu(["", text], [text, text]) == pytest.approx(sacrebleu.corpus_bleu(["", text], [[text, text]]).score)
    assert 0 < bleu(["", text], [text, text]) < 100


def test_every_metric_rejects_mismatched_lengths():
    text = "the quick brown fox jumps over the lazy dog"
    for metric in (exact_match, rouge_l, bleu):
        with pytest.raises(ValueError, match="2 predictions for 1 references"):
            metric([text, "extra"], [text])
        with pytest.raises(ValueError):
            metric(["a"], [])


def test_generation_metrics_on_no_examples_are_zero():
    assert generation_metrics([], []) == {"exact_match": 0.0, "bleu": 0.0, "rouge_l": 0.0}


def test_rouge_l_is_the_mean_rouge_score_f1_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / len(REFERENCES)
    assert 0 < expected < 1
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-12)
    # Argument order matters for precision/recall; F1 is symmetric but each pair must stay a pair.
    assert rouge_l(PREDICTIONS, REFERENCES) != pytest.approx(rouge_l(PREDICTIONS, REFERENCES[::-1]))


def test_rouge_l_stems_and_handles_edge_cases():
    assert rouge_l(["running dogs"], ["run dog"]) == pytest.approx(1.0)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score("run dog", "running dogs")
    assert unstemmed["rougeL"].fmeasure == 0.0  # so the 1.0 above comes from stemming
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["Grüße aus Köln, naïve café"], ["Grüße aus Köln, naïve café"]) == pytest.approx(1.0)
    assert rouge_l([""], ["an answer"]) == 0.0
    assert rouge_l(["", "the cat sat"], ["an answer", "the cat sat"]) == pytest.approx(0.5)
    assert rouge_l([], []) == 0.0


def test_exact_match_is_strict_apart_from_surrounding_whitespace():
    ref = '{"status": "refunded", "amount": 12.5}'
    assert exact_match([ref], [ref]) == 1.0
    assert exact_match(["  " + ref + "\n"], [ref]) == 1.0
    assert exact_match([ref.upper()], [ref]) == 0.0
    assert exact_match(['{"amount": 12.5, "status": "refunded"}'], [ref]) == 0.0  # key order counts
    assert exact_match([ref.replace(": ", ":")], [ref]) == 0.0  # inner whitespace counts
    assert exact_match(PREDICTIONS, REFERENCES) == pytest.approx(1 / 6)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a", "b"], ["a"])


def test_generation_metrics_reports_all_three():
    metrics = generation_metrics(PREDICTIONS, REFERENCES)
    assert metrics == {"exact_match": exact_match(PREDICTIONS, REFERENCES), "bleu": bleu(PREDICTIONS, REFERENCES),
                       "rouge_l": rouge_l(PREDICTIONS, REFERENCES)}


# ---------------------------------------------------------------- generation

QUESTIONS = [
    "hi",
    "Where is my parcel 7781? " * 6,
    "Refund please.",
    "Explain the warranty terms for order 42 in detail, " * 3,
    "ok",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The ops of a 32-wide model are tiny: extra threads only add synchronisation, and on a busy machine
    # waiting for a descheduled thread costs far more than the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def template(tokenizer):
    return resolve_chat_template("model", tokenizer)


@pytest.fixture(scope="module")
def records():
    return [
        {"id": f"q{i}", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"answer {i}"}]}
        for i, question in enumerate(QUESTIONS)
    ]


def greedy_reference(model, tokenizer, text: str, stops: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding of one unpadded prompt, whole sequence recomputed each step (no KV cache)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


@pytest.fixture(scope="module")
def model(tiny_model_dir, tokenizer, template, records):
    """The tiny model, made to say something: its random init only repeats the prompt's last token (a newline,
    which strips to ""). Its decoder weights are re-drawn, and the output row of the end-of-turn token is set to
    a hair above that of a token the model emits mid-answer for one prompt, so some answers stop early at the
    end-of-turn token and others run to max_new_tokens."""
    model = load_causal_lm(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.3, generator=gen)
        # Untie the output layer so that changing it does not change the prompts' input embeddings.
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        prompt = prompts_from_conversations(records[1:2], tokenizer, template)[0].text
        unstopped = greedy_reference(model, tokenizer, prompt, [], 8)
        eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.lm_head.weight[eot_id] = model.lm_head.weight[unstopped[5]] * 1.001
    return model


def test_prompts_are_the_templates_generation_prompt_and_references_the_last_assistant_turn(tokenizer, template):
    conversation = [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": "Status of order 5?"},
        {"role": "assistant", "content": '{"order": 5, "status": "open"}'},
        {"role": "user", "content": "And order 6?"},
        {"role": "assistant", "content": '{"order": 6, "status": "shipped"}'},
    ]
    records = [{"id": "a", "messages": conversation},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    prompts = prompts_from_conversations(records, tokenizer, template)

    assert [p.id for p in prompts] == ["a", "1"]
    assert [p.reference for p in prompts] == ['{"order": 6, "status": "shipped"}', "hello"]
    eot = end_of_turn_marker(tokenizer, template)
    assert eot == "<|im_end|>"
    for prompt, record in zip(prompts, records):
        assert prompt.text == render(record["messages"][:-1], tokenizer, template, add_generation_prompt=True)
        assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        # The model is asked to continue exactly where the reference answer sits in the training render.
        full = render(record["messages"], tokenizer, template, add_generation_prompt=False)
        assert full.startswith(prompt.text)
        assert full[len(prompt.text):].rstrip() == prompt.reference + eot
    assert prompts[0].text.count("<|im_start|>") == 5  # system, user, assistant, user, generation prompt
    assert "And order 6?" in prompts[0].text and "shipped" not in prompts[0].text
    # The model's own template adds its default system prompt when a conversation has none.
    assert prompts[1].text.startswith("<|im_start|>system\n")


def test_generate_matches_plain_greedy_decoding_prompt_by_prompt(model, tokenizer, template, records):
    prompts = prompts_from_conversations(records, tokenizer, template)
    eot = end_of_turn_marker(tokenizer, template)
    stops = stop_token_ids(tokenizer, eot)
    assert stops == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    max_new = 10
    expected_tokens = [greedy_reference(model, tokenizer, p.text, stops, max_new) for p in prompts]
    # Both ways of ending are exercised: stopping at the end-of-turn token and running out of tokens.
    assert any(len(t) < max_new for t in expected_tokens) and any(len(t) == max_new for t in expected_tokens)
    expected = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in expected_tokens]
    assert all(expected) and len(set(expected)) > 1

    # Batches of 3 mix prompts of very different lengths (left padding), and generate() reorders them by
    # length internally; the answers must still come back in input order, each as if generated alone.
    assert generate(model, tokenizer, prompts, eot, max_new, batch_size=3) == expected
    assert generate(model, tokenizer, prompts, eot, max_new, batch_size=len(prompts)) == expected
    assert [generate(model, tokenizer, [p], eot, max_new, batch_size=1)[0] for p in prompts] == expected


def test_generate_is_deterministic_and_padding_does_not_change_a_prompts_answer(model, tokenizer, template, records):
    prompts = prompts_from_conversations(records, tokenizer, template)
    eot = end_of_turn_marker(tokenizer, template)
    short = min(prompts, key=lambda p: len(p.text))
    longer = [p for p in prompts if len(p.text) > len(short.text) + 40]
    assert len(longer) >= 2
    alone = generate(model, tokenizer, [short], eot, 12, batch_size=1)
    batched = generate(model, tokenizer, [*longer, short], eot, 12, batch_size=8)
    assert batched[-1] == alone[0] != ""
    assert generate(model, tokenizer, [*longer, short], eot, 12, batch_size=8) == batched
    # A Prompt built by hand works the same as one from prompts_from_conversations.
    assert generate(model, tokenizer, [Prompt("x", short.text, "")], eot, 12, batch_size=1) == alone


@pytest.mark.parametrize("max_new_tokens", [1, 3, 7])
def test_generate_respects_max_new_tokens(model, tokenizer, template, records, max_new_tokens):
    prompts = prompts_from_conversations(records, tokenizer, template)
    eot = end_of_turn_marker(tokenizer, template)
    longest = generate(model, tokenizer, prompts, eot, 16, batch_size=len(prompts))
    outputs = generate(model, tokenizer, prompts, eot, max_new_tokens, batch_size=len(prompts))
    stops = stop_token_ids(tokenizer, eot)
    for prompt, out, full in zip(prompts, outputs, longest):
        tokens = greedy_reference(model, tokenizer, prompt.text, stops, max_new_tokens)
        assert len(tokens) <= max_new_tokens
        assert out == tokenizer.decode(tokens, skip_special_tokens=True).strip()
        # Greedy decoding is prefix-consistent: a shorter budget gives a prefix of the longer answer.
        assert full.startswith(out)


def test_stop_sequences_cut_the_greedy_answer_before_them(model, tokenizer, template, records):
    prompts = prompts_from_conversations(records, tokenizer, template)
    eot = end_of_turn_marker(tokenizer, template)
    full = generate(model, tokenizer, prompts, eot, 16, batch_size=len(prompts))
    # A stop string taken from inside one answer: that answer ends right before it, the others are unchanged
    # unless they contain it too.
    target = next(a for a in full if len(a) > 6)
    stop = target[3:6]
    cut = generate(model, tokenizer, prompts, eot, 16, batch_size=len(prompts), stop=[stop])
    for before, after in zip(full, cut):
        assert after == before.split(stop)[0].strip()
    assert cut[full.index(target)] == target[:3].strip()


def test_samples_per_prompt_are_seeded_and_raw_completions_keep_indentation(model, tokenizer, template, records):
    prompts = prompts_from_conversations(records, tokenizer, template)[:3]
    eot = end_of_turn_marker(tokenizer, template)
    draw = lambda seed: generate_samples(model, tokenizer, prompts, eot, 6, 4, do_sample=True, samples=3, seed=seed)
    first = draw(11)
    assert len(first) == 3 and all(len(s) == 3 for s in first)
    assert first == draw(11) and first != draw(12)
    assert len({a for s in first for a in s}) > 3  # sampling, not copies of one answer
    with pytest.raises(ValueError, match="identical"):
        generate_samples(model, tokenizer, prompts, eot, 6, 4, do_sample=False, samples=2)
    raw = generate_samples(model, tokenizer, [Prompt("c", "def f(x):\n", "")], eot, 8, 1, strip=False)[0][0]
    # Only trailing whitespace goes: a code body keeps the indentation it starts with.
    assert raw.strip() == generate(model, tokenizer, [Prompt("c", "def f(x):\n", "")], eot, 8, 1)[0]
    assert raw == raw.rstrip()


def test_score_generations_uses_the_metric_functions_set_wide_and_per_sample():
    predictions = [["the cat sat", "a cat"], ["on the mat", "on the mat"]]
    references = ["the cat sat", "on a mat"]
    corpus, per_sample = score_generations(predictions, references, ["exact_match", "chrf", "rouge"])
    first, second = [p[0] for p in predictions], [p[1] for p in predictions]
    assert corpus["exact_match"] == pytest.approx((exact_match(first, references) + exact_match(second, references)) / 2)
    assert corpus["chrf"] == pytest.approx((chrf(first, references) + chrf(second, references)) / 2)
    assert corpus["rougeLsum"] == pytest.approx((rouge(first, references)["rougeLsum"] + rouge(second, references)["rougeLsum"]) / 2)
    assert set(corpus) == {"exact_match", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert per_sample[0][0]["exact_match"] == 1.0 and per_sample[0][1]["exact_match"] == 0.0
    assert per_sample[1][1]["chrf"] == pytest.approx(chrf(["on the mat"], ["on a mat"]))
    with pytest.raises(ValueError, match="unknown metrics"):
        score_generations(predictions, references, ["meteor"])
