"""Rule rewards, user reward functions (and their clear errors) and the weighted sum (align/rewards.py)."""
import pytest

from zhllm.align.rewards import RewardSpec, build_rewards, length_penalty, numeric_answer
from zhllm.config import from_dict
from zhllm.errors import ConfigError, ZhllmError


def rewards(*entries):
    return build_rewards([from_dict(RewardSpec, e, "recipe.yaml", "rewards.") for e in entries], "recipe.yaml")


def test_rules_and_weighted_sum():
    r = rewards({"type": "exact"}, {"type": "numeric", "weight": 0.5}, {"type": "format", "pattern": "答案：.+"},
                {"type": "length", "target": 4, "weight": 0.1})
    texts = ["答案：7", "答案是 8 个", "77", "答案：7。再加 2 就是 9"]
    total, per = r.score(["问"] * 4, texts, ["7", "8", "7", "7"], [3, 10, 1, 12])
    assert per["exact"].tolist() == [1, 1, 0, 1]
    assert per["numeric"].tolist() == [1, 1, 0, 0]  # the last number of the text counts
    assert per["format"].tolist() == [1, 0, 0, 1]
    assert per["length"].tolist() == [0, -1, 0, -1]
    assert total.tolist() == pytest.approx([2.5, 1.4, 0, 1.9])
    assert r.needs_answer and r.answer_problem(None) == "missing answer"


def test_numeric_tolerance_and_unit_answers():
    assert numeric_answer("一共 3,500 克", "3500克") == 1
    assert numeric_answer("约 3.14159", "3.1416", tolerance=1e-4) == 1
    assert numeric_answer("没有数字", "3") == 0
    assert rewards({"type": "numeric"}).answer_problem("小红") == "answer has no number"
    assert length_penalty(6, 4) == -0.5


def test_user_function_from_a_file(tmp_path):
    (tmp_path / "my_reward.py").write_text(
        "def has_seven(prompts, completions, answer, **kw):\n    return [float('7' in c) for c in completions]\n")
    r = rewards({"type": "function", "function": f"{tmp_path}/my_reward.py:has_seven", "weight": 2})
    total, per = r.score(["q", "q"], ["7", "8"], [None, None], [1, 1])
    assert per["has_seven"].tolist() == [1, 0] and total.tolist() == [2, 0]
    assert not r.needs_answer


@pytest.mark.parametrize("body,spec,message", [
    ("", "nosuchmodule_zhllm:f", "cannot import nosuchmodule_zhllm"),
    ("import nosuchmodule_zhllm\n", "FILE:f", "cannot import .*ModuleNotFoundError"),
    ("def g(**kw):\n    return []\n", "FILE:f", "has no function f"),
    ("def f(**kw):\n    raise ValueError('boom')\n", "FILE:f", "'FILE:f' raised ValueError: boom"),
    ("def f(**kw):\n    return 1.0\n", "FILE:f", "returned a float; it must return a list of 2 numbers"),
    ("def f(**kw):\n    return ['a', 'b']\n", "FILE:f", "returned 'a' for completion 0"),
    ("def f(**kw):\n    return [float('nan'), 1]\n", "FILE:f", "rewards must be finite"),
    ("", "no_colon", "module:function"),
])
def test_broken_user_functions_are_clear_errors(tmp_path, body, spec, message):
    path = tmp_path / "broken.py"
    path.write_text(body)
    spec = spec.replace("FILE", str(path))
    with pytest.raises(ZhllmError, match=message.replace("FILE", str(path))) as e:
        rewards({"type": "function", "function": spec}).score(["q", "q"], ["a", "b"], [None, None], [1, 1])
    assert spec in str(e.value)


def test_config_mistakes_name_the_entry():
    with pytest.raises(ConfigError, match=r"rewards\[0\] \(format\): set `pattern`"):
        rewards({"type": "format"})
    with pytest.raises(ConfigError, match=r"rewards\[1\] \(exact\): `target` does not apply"):
        rewards({"type": "length", "target": 3}, {"type": "exact", "target": 3})
    with pytest.raises(ConfigError, match="not a regular expression"):
        rewards({"type": "format", "pattern": "("})
    with pytest.raises(ConfigError, match="a second reward named 'exact'"):
        rewards({"type": "exact"}, {"type": "exact"})
    with pytest.raises(ConfigError, match="must be one of"):
        rewards({"type": "magic"})
