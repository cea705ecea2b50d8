"""Benchmark loaders on local JSONL fixtures (offline), middle truncation, task names."""

from __future__ import annotations

import sys

import pytest

from namm.models import byte_tokenizer
from namm.tasks import (CHOUBUN_TASKS, INFINITEBENCH_TASKS, LONGBENCH_TASKS, load_task, middle_truncate,
                        resolve_task, score_sample)
from namm.tasks.jsonl import write_jsonl
from namm.tasks.longbench import benchmark_config


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_longbench_config_is_complete():
    assert len(LONGBENCH_TASKS) == 21
    tasks = benchmark_config("longbench")["tasks"]
    assert tasks["narrativeqa"]["max_new_tokens"] == 128 and tasks["gov_report"]["max_new_tokens"] == 512
    assert tasks["hotpotqa"]["max_new_tokens"] == 32 and tasks["lcc"]["max_new_tokens"] == 64
    assert tasks["dureader"]["metric"] == "rouge_zh" and tasks["passage_count"]["metric"] == "count"
    assert all("{context}" in spec["prompt"] for spec in tasks.values())
    assert len(CHOUBUN_TASKS) == 4 and len(INFINITEBENCH_TASKS) == 12


def test_longbench_jsonl_loads_offline_with_official_prompt(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [
        {"input": "Who wrote it?", "context": "Passage 1: Ann wrote it.", "answers": ["Ann"], "_id": "h1",
         "all_classes": None, "length": 5},
    ])
    write_jsonl(tmp_path / "samsum.jsonl", [
        {"input": "Dialogue: A: hi\nSummary:", "context": "Dialogue: B: yo\nSummary: B greets.",
         "answers": ["A says hi."], "_id": "s1"},
    ])
    write_jsonl(tmp_path / "trec.jsonl", [
        {"input": "What city?", "context": "Q: Who? Type: Individual", "answers": ["City"],
         "all_classes": ["City", "Individual", "Country"], "_id": "t1"},
    ])
    (hotpot,) = load_task("longbench:hotpotqa", data_dir=tmp_path)
    assert hotpot.id == "h1" and hotpot.metric == "qa_f1" and hotpot.max_new_tokens == 32
    assert hotpot.prompt.startswith("Answer the question based on the given passages.")
    assert hotpot.prompt.endswith("Question: Who wrote it?\nAnswer:") and "Ann wrote it." in hotpot.prompt
    assert score_sample(hotpot, " Ann") == 1.0
    (samsum,) = load_task("samsum", data_dir=tmp_path)  # bare LongBench names work too
    assert samsum.stop == ["\n"] and samsum.first_line and samsum.meta["no_chat"]
    (trec,) = load_task("longbench:trec", data_dir=tmp_path)
    assert score_sample(trec, "City\nIndividual") == 1.0  # first line only


def test_missing_local_file_and_missing_datasets_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="qasper.jsonl"):
        load_task("longbench:qasper", data_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(RuntimeError, match="--data-dir"):
        load_task("longbench:qasper")


def test_middle_truncation_keeps_head_and_tail(tok):
    assert middle_truncate("abcdefghij", tok, 4) == "abij"
    assert middle_truncate("abcdefghij", tok, 5) == "abij"  # floor(5 / 2) from each end
    assert middle_truncate("abc", tok, 4) == "abc"


def test_benchmark_prompts_truncate_to_length(tmp_path, tok):
    write_jsonl(tmp_path / "qasper.jsonl", [{"input": "Q?", "context": "x" * 5000, "answers": ["a"], "_id": "q"}])
    (s,) = load_task("longbench:qasper", tok, length=600, data_dir=tmp_path)
    assert len(tok(s.prompt, add_special_tokens=False)["input_ids"]) == 600
    assert s.prompt.startswith("You are given a scientific article") and s.prompt.endswith("Answer:")


def test_choubun_jsonl(tmp_path):
    write_jsonl(tmp_path / "wiki_qa.jsonl", [{"input": "首都は？", "context": "日本の首都は東京です。",
                                               "answers": ["東京"], "_id": "w1"}])
    (s,) = load_task("choubun:wiki_qa", data_dir=tmp_path)
    assert s.metric == "qa_f1_ja" and s.max_new_tokens == 64
    assert s.prompt.endswith("### 質問 ###\n首都は？\n### 回答 ###\n")
    assert resolve_task("wiki_qa") == ("choubun", "wiki_qa")


def test_infinitebench_jsonl_and_scorers(tmp_path):
    write_jsonl(tmp_path / "passkey.jsonl", [{"id": 0, "context": "noise 71432 noise", "input": "What is the pass key?",
                                               "answer": ["71432"], "options": []}])
    write_jsonl(tmp_path / "longbook_choice_eng.jsonl", [{"id": 1, "context": "book", "input": "Who?",
                                                          "answer": ["Bob"], "options": ["Ann", "Bob", "Cy", "Di"]}])
    (pk,) = load_task("infinitebench:passkey", data_dir=tmp_path)
    assert pk.prompt.endswith("What is the pass key?\n\nThe pass key is") and pk.max_new_tokens == 6
    assert score_sample(pk, " 71432.") == 1.0 and score_sample(pk, " 7143") == 0.0
    (mc,) = load_task("infinitebench:longbook_choice_eng", data_dir=tmp_path)
    assert mc.answers == ["Bob", "B"] and "B. Bob" in mc.prompt
    assert score_sample(mc, "B") == 1.0 and score_sample(mc, "The answer is: B") == 1.0
    assert score_sample(mc, "A") == 0.0
    assert resolve_task("passkey") == ("synthetic", "passkey")


def test_generic_jsonl_file(tmp_path, tok):
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, [{"context": "The sky is green here.", "question": "What colour is the sky?",
                        "answers": ["green"], "metric": "string_match", "max_new_tokens": 4}])
    (s,) = load_task(str(path), tok)
    assert s.task == "mine" and s.metric == "string_match" and s.max_new_tokens == 4
    assert s.prompt == "The sky is green here.\n\nQuestion: What colour is the sky?\nAnswer:"
    samples = load_task(f"jsonl:{path}", tok)
    assert samples[0].prompt == s.prompt
    write_jsonl(path, [s.to_dict()])  # namm's own schema round-trips
    assert load_task(str(path), tok)[0] == s
    path.write_text('{"context": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="answers"):
        load_task(str(path), tok)


def test_infinitebench_scorers_by_hand():
    from namm.tasks.infinitebench import code_debug, code_run, dialogue, kv_words, math_calc, math_find

    assert kv_words('The value is "ab-12".', "ab-12") == 1.0 and kv_words("ab-123", "ab-12") == 0.0
    assert code_run("The value of f(3) is 42.", "42") == 1.0 and code_run("42 or 7", "42") == 0.0
    assert code_debug("B. func_b", ["func_b", "B"]) == 1.0
    assert code_debug("The answer is: func_b", ["func_b", "B"]) == 1.0
    assert code_debug("I think C", ["func_b", "B"]) == 0.0
    assert math_calc("[1, 4, 9, 3]", ["1", "4", "8", "3"]) == 0.5  # counted until the first mistake
    assert math_find("It is 17.", "17") == 1.0
    assert dialogue("Probably Alice.", ["ALICE"]) == 1.0
