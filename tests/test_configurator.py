"""configurator.get_config: config files, both override forms, flags, type checks, --help."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from configurator import ConfigError, Options, exit_with_error, get_config

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "out_dir": "out",
    "start": "\n",
    "device": "auto",
    "batch_size": 12,
    "learning_rate": 6e-4,
    "compile": False,
    "top_k": None,
    "betas": (0.9, 0.95),
}
TYPES = {"top_k": int}


def test_defaults_are_copied_not_shared():
    config = get_config(DEFAULTS, [], types=TYPES)
    assert config == DEFAULTS and config is not DEFAULTS
    config["batch_size"] = 1
    assert DEFAULTS["batch_size"] == 12


def test_both_override_forms_and_literal_parsing():
    argv = ["--batch_size=32", "--learning_rate", "1e-3", "--top_k=200", "--start", "苏落妩媚一笑",
            "--betas=(0.8, 0.99)"]
    config = get_config(DEFAULTS, argv, types=TYPES)
    assert config["batch_size"] == 32 and type(config["batch_size"]) is int
    assert config["learning_rate"] == 1e-3
    assert config["top_k"] == 200
    assert config["start"] == "苏落妩媚一笑"
    assert config["betas"] == (0.8, 0.99)


def test_string_keys_keep_the_raw_text():
    config = get_config(DEFAULTS, ["--device", "0", "--start=123", "--out_dir", "[1, 2]"], types=TYPES)
    assert config["device"] == "0" and config["start"] == "123" and config["out_dir"] == "[1, 2]"


def test_float_key_accepts_an_int_and_stores_a_float():
    config = get_config(DEFAULTS, ["--learning_rate=1"], types=TYPES)
    assert config["learning_rate"] == 1.0 and type(config["learning_rate"]) is float


def test_none_default_takes_its_declared_type_or_none():
    assert get_config(DEFAULTS, ["--top_k", "None"], types=TYPES)["top_k"] is None
    assert get_config(DEFAULTS, ["--top_k", "7"], types=TYPES)["top_k"] == 7
    with pytest.raises(ConfigError, match="--top_k expects an integer"):
        get_config(DEFAULTS, ["--top_k", "abc"], types=TYPES)
    with pytest.raises(TypeError, match="declare its type"):
        get_config(DEFAULTS, [])


@pytest.mark.parametrize("word", ["yes", "no", "0", "1", "off", "on"])
def test_bool_keys_refuse_words_other_than_true_and_false(word):
    with pytest.raises(ConfigError, match="--compile expects True or False"):
        get_config(DEFAULTS, [f"--compile={word}"], types=TYPES)
    with pytest.raises(ConfigError, match="--auto_compile expects True or False"):
        get_config({**DEFAULTS, "auto_compile": None}, [f"--auto_compile={word}"], types={**TYPES, "auto_compile": bool})


def test_positional_argument_is_a_value_not_a_config_file():
    defaults = {"source": "", "name": ""}
    config = get_config(defaults, ["novel.txt", "--name", "x"], positional="source")
    assert config == {"source": "novel.txt", "name": "x"}
    with pytest.raises(ConfigError, match="one source only"):
        get_config(defaults, ["a.txt", "b.txt"], positional="source")


def test_bool_flag_bare_and_with_values():
    assert get_config(DEFAULTS, ["--compile"], types=TYPES)["compile"] is True
    # a bare flag followed by another option, as in `--save_samples --save_samples_path ./mnt/`
    config = get_config(DEFAULTS, ["--compile", "--out_dir", "x"], types=TYPES)
    assert config["compile"] is True and config["out_dir"] == "x"
    assert get_config(DEFAULTS, ["--compile", "false"], types=TYPES)["compile"] is False
    assert get_config(DEFAULTS, ["--compile=False"], types=TYPES)["compile"] is False
    assert get_config(DEFAULTS, ["--compile", "True"], types=TYPES)["compile"] is True


@pytest.mark.parametrize("argv, words", [
    (["--batch_size=abc"], ["--batch_size", "integer", "'abc'"]),
    (["--batch_size", "2.5"], ["--batch_size", "integer", "2.5"]),
    (["--learning_rate=fast"], ["--learning_rate", "number", "'fast'"]),
    (["--compile=1"], ["--compile", "True or False", "1"]),
    (["--betas=0.9"], ["--betas", "tuple", "0.9"]),
])
def test_type_mismatch_names_key_type_and_value(argv, words):
    with pytest.raises(ConfigError) as info:
        get_config(DEFAULTS, argv, types=TYPES)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_suggests_closest_keys():
    with pytest.raises(ConfigError) as info:
        get_config(DEFAULTS, ["--batchsize=4"], types=TYPES)
    assert "batchsize" in str(info.value) and "--batch_size" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean --top_k"):
        get_config(DEFAULTS, ["--topk", "5"], types=TYPES)


def test_missing_value_and_single_dash_option_are_errors():
    with pytest.raises(ConfigError, match="--batch_size needs a value"):
        get_config(DEFAULTS, ["--batch_size"], types=TYPES)
    with pytest.raises(ConfigError, match="--key=value"):
        get_config(DEFAULTS, ["-batch_size=3"], types=TYPES)


def test_aliases_map_to_keys_and_are_suggested():
    aliases = {"prefix": "start", "topk": "top_k", "save": "compile"}
    config = get_config(DEFAULTS, ["--prefix", "[CLS]苏落", "--topk=8", "--save"], aliases, types=TYPES)
    assert config["start"] == "[CLS]苏落" and config["top_k"] == 8 and config["compile"] is True
    assert "prefix" not in config
    with pytest.raises(ConfigError, match="--prefix"):
        get_config(DEFAULTS, ["--prefx=a"], aliases, types=TYPES)


def test_config_file_with_chinese_text(tmp_path):
    path = tmp_path / "novel.py"
    path.write_text(
        "import math\n"
        "# 红楼梦 settings\n"
        "_scale = 2\n"
        "start = '宝玉笑道：“妹妹”'\n"
        "batch_size = 4 * _scale\n"
        "learning_rate = 1 / math.sqrt(16)\n",
        encoding="utf-8")
    config = get_config(DEFAULTS, [str(path)], types=TYPES)
    assert config["start"] == "宝玉笑道：“妹妹”"
    assert config["batch_size"] == 8 and config["learning_rate"] == 0.25
    assert "math" not in config and "_scale" not in config
    # command-line overrides win over the file, wherever they are written
    assert get_config(DEFAULTS, ["--batch_size=3", str(path)], types=TYPES)["batch_size"] == 3


def test_config_file_errors(tmp_path):
    unknown = tmp_path / "bad.py"
    unknown.write_text("batch_size = 4\nlearnig_rate = 1e-3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        get_config(DEFAULTS, [str(unknown)], types=TYPES)
    assert "bad.py" in str(info.value) and "learnig_rate" in str(info.value)
    assert "--learning_rate" in str(info.value)

    wrong_type = tmp_path / "wrong.py"
    wrong_type.write_text("batch_size = '4'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="--batch_size expects an integer"):
        get_config(DEFAULTS, [str(wrong_type)], types=TYPES)

    broken = tmp_path / "broken.py"
    broken.write_text("batch_size = 4\nstart = (\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.py, line \d+: SyntaxError"):
        get_config(DEFAULTS, [str(broken)], types=TYPES)

    failing = tmp_path / "failing.py"
    failing.write_text("batch_size = 4\nlearning_rate = 1 / 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="failing.py, line 2: ZeroDivisionError"):
        get_config(DEFAULTS, [str(failing)], types=TYPES)

    with pytest.raises(ConfigError, match="config file not found"):
        get_config(DEFAULTS, [str(tmp_path / "missing.py")], types=TYPES)

    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("start = '\u00e9t\u00e9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        get_config(DEFAULTS, [str(latin1)], types=TYPES)


def test_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit) as info:
        get_config(DEFAULTS, ["--batch_size=3", "--help"], {"topk": "top_k"}, types=TYPES)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key, default in DEFAULTS.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{key} "))
        assert repr(default) in line
    assert "--topk" in out and "same as --top_k" in out


def test_exit_with_error_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        exit_with_error(ConfigError("unknown option 'x'"))
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: unknown option 'x'\n"


@pytest.mark.slow
def test_works_from_a_script_in_a_subprocess(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from configurator import ConfigError, exit_with_error, get_config\n"
        "try:\n"
        "    config = get_config({'start': 'x', 'steps': 1})\n"
        "except ConfigError as e:\n"
        "    exit_with_error(e)\n"
        "print(config['start'], config['steps'])\n",
        encoding="utf-8")
    ok = subprocess.run([sys.executable, str(script), "--start", "苏落妩媚一笑", "--steps=5"],
                        capture_output=True, text=True, encoding="utf-8")
    assert ok.returncode == 0 and ok.stdout == "苏落妩媚一笑 5\n"
    bad = subprocess.run([sys.executable, str(script), "--step=5"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "did you mean --steps" in bad.stderr


def test_options_keep_defaults_and_help_prints_each_explanation(capsys):
    options = Options(steps=(5, "how many steps"), name=("", "empty: the input's name"))
    assert dict(options) == {"steps": 5, "name": ""} and get_config(options, ["--steps=7"]) == {"steps": 7, "name": ""}
    more = options.with_more(extra=(1.5, "one more"))
    assert list(more) == ["steps", "name", "extra"] and more.explanations["steps"] == "how many steps"
    with pytest.raises(SystemExit):
        get_config(more, ["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["--steps", "5", "how", "many", "steps"] for line in lines)
    assert any(line.startswith("  --name ") and line.endswith("''   empty: the input's name") for line in lines)


@pytest.mark.parametrize("script", ["train", "sample", "serve", "evaluate", "export", "prepare"])
def test_every_script_explains_every_key_in_its_help(script, capsys):
    module = importlib.import_module(script)
    try:
        module.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for key, default in module.DEFAULTS.items():
        explanation = module.DEFAULTS.explanations[key]
        assert explanation, f"{script}.py --{key} has no explanation"
        # the last such line: sample.py and train.py list GPT2-Chinese's flags of the same names first
        line = [line for line in out.splitlines() if line.strip().startswith(f"--{key} ")][-1]
        assert repr(default) in line and line.endswith(explanation), line
