"""Reading a model's answer back out of free text, and judging it against a task's exact answer.

Answers are short: a number (maybe with a unit: "3500克"), a weekday ("星期二") or a name ("小红").
A model may say "答案：42", "答案是 42 个。", "结果为42", "周二" or just "42"; all of these must count.
"""
from __future__ import annotations

import re
import unicodedata

# Longest first so "千克" wins over "克" and "分钟" over "分".
UNITS = ["千米", "厘米", "公里", "米", "千克", "公斤", "克", "小时", "分钟", "秒", "元", "角", "分",
         "天", "个", "本", "支", "颗", "条", "朵", "张", "只", "盒", "岁"]
UNIT_SYNONYMS = {"公里": "千米", "公斤": "千克"}
WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]

_MARKER = re.compile(r"答案\s*(?:是|为|：|:)\s*(?:是|为)?")
_WEEKDAY = re.compile(r"(?:星期|礼拜|周)([一二三四五六日天])")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?\s*(" + "|".join(UNITS) + r")?")
_SENTENCE_END = re.compile(r"[。！？!?\n；;，,]")


def _normalise(text: str) -> str:
    # NFKC turns full-width digits and colons into ASCII; thousands separators never carry meaning here.
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"(?<=\d),(?=\d{3})", "", text)


def _canonical_weekday(day_char: str) -> str:
    return "星期日" if day_char in "日天" else "星期" + day_char


def extract_answer(text: str) -> str | None:
    """The answer a piece of model output gives, in canonical form, or None if it gives none.

    Looks after the last "答案：/答案是" when present, else at the whole text; returns the first weekday or
    number(+unit) found there, otherwise the first clause (for name answers such as "小红").
    """
    text = _normalise(text or "").strip()
    markers = list(_MARKER.finditer(text))
    segment = text[markers[-1].end():] if markers else text
    segment = segment.strip()
    if not segment:
        return None
    first_clause = _SENTENCE_END.split(segment, maxsplit=1)[0].strip()
    weekday, number = _WEEKDAY.search(segment), _NUMBER.search(segment)
    candidates = [m for m in (weekday, number) if m is not None]
    # A name answer ("小红更高。") has neither; a numeric/weekday answer must lie in the answer's clause
    # when a marker exists, so "答案：小红，她身高150厘米" stays "小红".
    if markers:
        candidates = [m for m in candidates if m.start() < len(first_clause)]
    if candidates:
        match = min(candidates, key=lambda m: m.start())
        if match is weekday:
            return _canonical_weekday(match.group(1))
        unit = match.group(1) or ""
        number_text = match.group(0)[: len(match.group(0)) - len(unit)].strip()
        return _canonical_number(number_text) + UNIT_SYNONYMS.get(unit, unit)
    return first_clause.strip("：:\"“”'") or None


def _canonical_number(number_text: str) -> str:
    value = float(number_text)
    return str(int(value)) if value.is_integer() else str(value)


def _split_number(answer: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)(\D*)", answer)
    return (match.group(1), match.group(2)) if match else None


def is_correct(task, model_output: str) -> bool:
    """Exact match of the model's answer against `task.answer`, after normalisation.

    A bare number is accepted for a unit answer ("3500" for "3500克") because the question already names
    the unit, and a counted unit for a bare-number answer ("42个" for "42"); a different unit is wrong. A name
    answer may be followed by a comparison ("小红更高").
    """
    got = extract_answer(model_output)
    if got is None:
        return False
    expected = extract_answer(task.answer) or task.answer
    if got == expected:
        return True
    got_number, expected_number = _split_number(got), _split_number(expected)
    if got_number and expected_number:
        units_agree = "" in (got_number[1], expected_number[1]) or got_number[1] == expected_number[1]
        return got_number[0] == expected_number[0] and units_agree
    if expected_number is None and got.startswith(expected):
        return got[len(expected):].startswith("更")
    return False
