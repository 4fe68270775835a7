"""stp.config: presets (recipe files), layering (defaults < preset < YAML < flags), YAML round trip, validation
messages, CLI, the sections found with the methods (a new method's own section by adding only its module)."""

import dataclasses
import textwrap

import pytest
import yaml

from stp import config as C
from stp.config import PRESETS, SECTIONS, ConfigError, TrainConfig, parse_args, resolve

STP_TASKS = ("gsm8k", "math", "countdown", "sudoku")


def _flat(cfg: TrainConfig) -> dict:
    """The settings the config's method reads (``to_dict``: hidden ones are not part of a run)."""
    d = cfg.to_dict()
    return {"method": cfg.method, **{f"{s}.{k}": v for s in SECTIONS for k, v in d.get(s, {}).items()}}


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_validates_and_round_trips(name, tmp_path):
    cfg = resolve(preset=name)
    assert cfg.preset == name
    assert cfg.run.output_dir == f"runs/{name}"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.validate() == cfg
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert parse_args(["--config", str(path)]) == cfg  # the saved config reproduces the run (its preset included)


def test_default_is_tiny_and_equals_the_dataclass_defaults():
    assert parse_args([]) == resolve() == resolve(preset="tiny")
    assert TrainConfig() == resolve("tiny")
    cfg = TrainConfig()
    assert cfg.model.name_or_path == "pretrained:sudoku" and cfg.run.task == "sudoku"
    assert cfg.run.data_source == "generated" and cfg.run.prompt_format == "compact"
    assert (cfg.rollout.gen_length, cfg.rollout.block_length, cfg.rollout.steps) == (32, 32, 16)
    assert cfg.model.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj")


@pytest.mark.parametrize("task", STP_TASKS)
def test_llada_presets_have_the_paper_settings(task):
    c = resolve(f"llada-{task}")
    assert (c.model.name_or_path, c.model.dtype, c.model.use_lora) == ("GSAI-ML/LLaDA-8B-Instruct", "bfloat16", True)
    assert (c.model.lora_r, c.model.lora_alpha, c.model.lora_dropout) == (128, 64, 0.05)
    g = c.grpo
    assert (g.epsilon, g.beta, g.num_iterations, g.num_generations, g.prompts_per_step) == (0.2, 0.04, 4, 6, 2)
    assert (g.adam_beta1, g.adam_beta2, g.weight_decay, g.learning_rate) == (0.9, 0.99, 0.1, 3e-6)
    assert (g.lr_scheduler_type, g.max_grad_norm, g.scale_rewards) == ("constant_with_warmup", 0.2, True)
    assert g.max_steps == (4000 if task == "math" else 6000)
    r = c.rollout
    assert (r.gen_length, r.block_length, r.steps, r.temperature, r.max_prompt_length, r.early_stop) == (
        256, 32, 128, 0.9, 200, 0.95)
    assert r.cache == "dual", "the LLaDA presets decode with the engine's dual cache (their notes say why)"
    assert any("rollout.cache dual" in n for n in PRESETS["llada-gsm8k"].notes)
    assert c.prior.enabled and c.prior.rho == (0.85 if task == "math" else 0.95)
    assert c.prior.strategy == "answer_low_confidence"
    assert (c.method, c.estimator.num_draws, c.estimator.score) == ("stp", 3, "all")
    assert c.run.mixed_precision == "bf16" and c.run.task == task


@pytest.mark.parametrize("base", ["tiny", *STP_TASKS])
def test_baselines_differ_from_stp_exactly_where_documented(base):
    stp_name = base if base == "tiny" else f"llada-{base}"
    stp = _flat(resolve(stp_name))
    d1_mu = {"tiny": 4, "gsm8k": 12, "math": 12, "countdown": 8, "sudoku": 8}[base]
    expected = {
        f"d1-{base}": {"method": "d1", "estimator.num_draws": 1, "estimator.prompt_mask_prob": 0.15,
                       "prior.enabled": False, "rollout.early_stop": None, "grpo.epsilon": 0.5,
                       "grpo.num_iterations": d1_mu, "grpo.scale_rewards": False,
                       # d1 as published decodes uncached; the LLaDA presets use the dual cache
                       **({} if base == "tiny" else {"rollout.cache": "none"})},
        f"elbo-{base}": {"method": "elbo", "prior.enabled": False, "rollout.early_stop": None},
    }
    for name, diff in expected.items():
        got = _flat(resolve(name))
        changed = {k: got[k] for k in got if (k not in stp or got[k] != stp[k]) and k != "run.output_dir"}
        changed.update({k: False for k in stp if k == "prior.enabled" and k not in got})  # no anchors
        assert changed == diff, name
        assert PRESETS[name].notes, f"{name} must document its deviations"


def test_presets_table_lists_every_preset():
    table = C.presets_table()
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(PRESETS)
    for name in PRESETS:
        assert f"`{name}`" in table
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_choices_match_the_modules_that_consume_them():
    from stp import likelihood, prior
    from stp.models import base
    from stp.tasks import TASKS

    assert C.ESTIMATORS == likelihood.ESTIMATORS and C.SCORE_MODES == likelihood.SCORE_MODES
    assert C.MASK_SCHEMES == likelihood.MASK_SCHEMES and C.STRATEGIES == prior.STRATEGIES
    assert C.FREE_RULES == prior.FREE_RULES
    assert C.ATTN_IMPLEMENTATIONS == base.SUPPORTED_ATTN
    task_field = next(f for f in dataclasses.fields(C.RunConfig) if f.name == "task")
    assert set(task_field.metadata["choices"]) == set(TASKS)


def test_estimator_section_gives_the_losss_likelihood_config():
    lk = resolve("llada-gsm8k").estimator.to_likelihood_config("stp", backend="reference")
    assert (lk.estimator, lk.num_draws, lk.score, lk.backend) == ("stp", 3, "all", "reference")


# ---------------------------------------------------------------------------------------------------- precedence


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    path = _write(tmp_path, """
        grpo:
          learning_rate: 1.0e-6
          beta: 0.01
        """)
    base = resolve("llada-gsm8k")
    assert base.grpo.learning_rate == 3e-6 and base.grpo.epsilon == 0.2  # preset over dataclass defaults
    from_file = parse_args(["--preset", "llada-gsm8k", "--config", str(path)])
    assert (from_file.grpo.learning_rate, from_file.grpo.beta, from_file.grpo.epsilon) == (1e-6, 0.01, 0.2)
    flags = parse_args(["--preset", "llada-gsm8k", "--config", str(path), "--grpo.learning_rate", "2e-6",
                        "--grpo.epsilon=0.3"])
    assert (flags.grpo.learning_rate, flags.grpo.beta, flags.grpo.epsilon) == (2e-6, 0.01, 0.3)
    assert flags.rollout.gen_length == 256  # untouched preset value


def test_yaml_preset_key_is_used_unless_the_flag_overrides_it(tmp_path):
    path = _write(tmp_path, "preset: d1-math\nrun:\n  seed: 7\n")
    cfg = parse_args(["--config", str(path)])
    assert (cfg.preset, cfg.method, cfg.run.seed) == ("d1-math", "d1", 7)
    assert parse_args(["--config", str(path), "--preset", "tiny"]).preset == "tiny"


def test_cli_value_forms():
    cfg = parse_args(["--run.resume", "--rollout.early_stop", "none", "--model.lora_target_modules", "q_proj,v_proj",
                      "--no-run.tensorboard", "--run.d1_compat", "true", "--grpo.scale_rewards", "false"])
    assert cfg.run.resume is True and cfg.run.tensorboard is False and cfg.run.d1_compat is True
    assert cfg.rollout.early_stop is None and cfg.grpo.scale_rewards is False
    assert cfg.model.lora_target_modules == ("q_proj", "v_proj")
    cfg = parse_args(["--run.resume", "--no-run.resume"])
    assert cfg.run.resume is False


def test_yaml_strings_that_are_numbers_are_accepted(tmp_path):
    # PyYAML reads 1e-6 (no dot) as a string: accepted as the number it spells.
    path = _write(tmp_path, "grpo:\n  learning_rate: 1e-6\nrollout:\n  early_stop: null\n")
    cfg = parse_args(["--config", str(path)])
    assert cfg.grpo.learning_rate == 1e-6 and cfg.rollout.early_stop is None


# ------------------------------------------------------------------------------------------------- round trips


def test_to_dict_from_dict_and_yaml_round_trip_after_overrides():
    cfg = parse_args(["--preset", "elbo-math", "--grpo.learning_rate", "1e-5", "--run.data_path", "x.jsonl",
                      "--estimator.memory_budget", "1000000"])
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert isinstance(d["model"]["lora_target_modules"], list)


def test_main_prints_resolved_yaml(capsys):
    assert C.main(["--preset", "llada-gsm8k", "--print"]) == 0
    out = capsys.readouterr().out
    assert TrainConfig.from_dict(yaml.safe_load(out)) == resolve("llada-gsm8k")
    assert C.main(["--grpo.epsilon", "0"]) == 2
    assert "grpo.epsilon" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("flag, value, field, allowed", [
    ("grpo.epsilon", "-0.1", "grpo.epsilon", "> 0"),
    ("grpo.beta", "-1", "grpo.beta", ">= 0"),
    ("grpo.num_generations", "1", "grpo.num_generations", ">= 2"),
    ("grpo.num_iterations", "0", "grpo.num_iterations", ">= 1"),
    ("grpo.learning_rate", "abc", "grpo.learning_rate", "a finite number"),
    ("grpo.learning_rate", "nan", "grpo.learning_rate", "a finite number"),
    ("grpo.lr_scheduler_type", "step", "grpo.lr_scheduler_type", "constant_with_warmup"),
    ("grpo.gradient_accumulation_steps", "3", "grpo.gradient_accumulation_steps", "a divisor of"),
    ("rollout.block_length", "24", "rollout.block_length", "a divisor of rollout.gen_length=32"),
    ("rollout.steps", "0", "rollout.steps", "an integer >= 1"),
    ("rollout.early_stop", "1.5", "rollout.early_stop", "(0, 1]"),
    ("rollout.gen_length", "1.5", "rollout.gen_length", "an integer"),
    ("rollout.remasking", "entropy", "rollout.remasking", "low_confidence"),
    ("prior.rho", "2", "prior.rho", "[0, 1]"),
    ("prior.strategy", "best", "prior.strategy", "answer_low_confidence"),
    ("prior.free_rule", "tags", "prior.free_rule", "'inside', 'inclusive'"),
    ("method", "vrpo", "method", "'stp', 'elbo', 'd1'"),
    ("estimator.num_draws", "0", "estimator.num_draws", ">= 1"),
    ("estimator.memory_budget", "0", "estimator.memory_budget", "bytes >= 1"),
    ("model.dtype", "int8", "model.dtype", "bfloat16"),
    ("model.lora_dropout", "1", "model.lora_dropout", "[0, 1)"),
    ("model.load_in_4bit", "maybe", "model.load_in_4bit", "true or false"),
    ("run.task", "mbpp", "run.task", "gsm8k"),
    ("run.device", "gpu", "run.device", "cuda:N"),
    ("run.mixed_precision", "fp8", "run.mixed_precision", "bf16"),
    ("run.max_nan_steps", "0", "run.max_nan_steps", ">= 1"),
])
def test_bad_flag_names_field_value_allowed_and_flag(flag, value, field, allowed):
    with pytest.raises(ConfigError) as info:
        parse_args([f"--{flag}", value])
    err = info.value
    msg = str(err)
    assert err.field == field and field in msg
    assert value.lstrip("-") in msg or repr(err.value) in msg
    assert "allowed:" in msg and allowed in msg
    assert msg.startswith(f"command line --{flag}:")


@pytest.mark.parametrize("argv, field, allowed", [
    (["--preset", "d1-gsm8k", "--prior.enabled"], "prior.enabled", "a setting of method 'stp' only"),
    (["--estimator.score", "elbo"], "estimator.score", "RESULTS.md"),
    (["--preset", "elbo-gsm8k", "--estimator.score", "elbo", "--estimator.mask_scheme", "block"], "estimator.score",
     "random_count"),
    (["--no-model.use_lora"], "grpo.beta", "model.use_lora"),
    (["--no-model.use_lora", "--grpo.beta", "0", "--model.load_in_4bit"], "model.load_in_4bit", "use_lora"),
    (["--prior.build_block_length", "24"], "prior.build_block_length", "a divisor of rollout.gen_length=32"),
    (["--rollout.gen_length", "64", "--prior.build_steps", "3"], "prior.build_steps",
     "a multiple of the number of prior blocks"),
    (["--rollout.gen_length", "64", "--rollout.steps", "3"], "rollout.steps", "a multiple of the number of blocks"),
    (["--run.task", "gsm8k", "--run.data_source", "hub"], "run.prompt_format", "'chat' for task 'gsm8k'"),
    (["--model.name_or_path", "pretrained:math"], "model.name_or_path", "'pretrained:sudoku'"),
    (["--preset", "llada-gsm8k", "--run.data_source", "generated"], "run.data_source", "countdown, sudoku"),
    (["--run.data_source", "file"], "run.data_source", "needs run.data_path"),
    (["--preset", "nope"], "preset", "llada-gsm8k"),
])
def test_cross_field_rules(argv, field, allowed):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert info.value.field == field and field in str(info.value) and allowed in str(info.value)


def test_method_settings_only_for_that_method():
    with pytest.raises(ConfigError, match=r"estimator.prompt_mask_prob=1.5 is not allowed; allowed: a number in \["):
        parse_args(["--method", "d1", "--estimator.prompt_mask_prob", "1.5"])
    with pytest.raises(ConfigError, match="estimator.prompt_mask_prob is a setting of method 'd1' only"):
        parse_args(["--estimator.prompt_mask_prob", "0.2"])
    cfg = parse_args(["--method", "d1", "--estimator.prompt_mask_prob", "0.2"])
    assert "prior" not in cfg.to_dict() and cfg.to_dict()["estimator"]["prompt_mask_prob"] == 0.2
    assert "prompt_mask_prob" not in resolve().to_dict()["estimator"]
    assert "--estimator.prompt_mask_prob" not in C.build_parser().format_help()


def test_cross_field_rule_passes_once_fixed():
    cfg = parse_args(["--preset", "d1-gsm8k"])
    assert not cfg.prior.enabled and cfg.prior_path is None
    cfg = parse_args(["--preset", "elbo-gsm8k", "--estimator.score", "elbo"])  # no anchors: allowed
    assert cfg.estimator.score == "elbo"
    cfg = parse_args(["--no-model.use_lora", "--grpo.beta", "0"])
    assert not cfg.model.use_lora and cfg.prior_path == "runs/tiny/priors.jsonl"


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match=r"^grpo\.epsilon=-0\.1 is not allowed; allowed: a number > 0$"):
        C.GRPOConfig(epsilon=-0.1)
    with pytest.raises(ConfigError, match="rollout.block_length=48"):
        C.RolloutConfig(gen_length=256, block_length=48)
    with pytest.raises(ConfigError, match="method='vrpo' is not allowed"):
        TrainConfig(method="vrpo")
    assert not TrainConfig(method="d1").prior.enabled  # d1 reads no prior settings: anchors off
    with pytest.raises(ConfigError, match="model.lora_r=True"):
        C.ModelConfig(lora_r=True)
    assert isinstance(TrainConfig(model={"lora_r": 8}).model, C.ModelConfig)


def test_validate_after_in_place_change():
    cfg = TrainConfig()
    cfg.grpo.epsilon = 0
    with pytest.raises(ConfigError, match="grpo.epsilon"):
        cfg.validate()


def test_unknown_flag_suggests_close_ones():
    with pytest.raises(ConfigError, match=r"unknown argument '--grpo.epsilom'; did you mean --grpo.epsilon"):
        parse_args(["--grpo.epsilom", "0.3"])


# ----------------------------------------------------------------------------------------------------------- YAML


def test_unknown_yaml_keys_name_the_key_line_and_allowed(tmp_path):
    path = _write(tmp_path, "grpo:\n  epsilon: 0.3\n  epsilom: 0.3\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(path)])
    msg = str(info.value)
    assert msg.startswith(f"{path}, line 3:") and "grpo.epsilom" in msg and "epsilon" in msg and "beta" in msg
    path = _write(tmp_path, "optimizer:\n  lr: 1\n", "top.yaml")
    with pytest.raises(ConfigError, match=r"top.yaml, line 1: unknown key 'optimizer'; allowed top-level keys: "
                                          r"preset, model, rollout"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        TrainConfig.from_dict({"optimizer": {}})


def test_bad_yaml_value_reports_its_line(tmp_path):
    path = _write(tmp_path, """
        # a comment
        model:
          lora_r: 8
        grpo:
          beta: 0.0
          epsilon: -0.5
        """)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(path)])
    assert str(info.value) == f"{path}, line 7: grpo.epsilon=-0.5 is not allowed; allowed: a number > 0"
    assert info.value.origin == f"{path}, line 7"
    # A flag that fixes the value wins over the file.
    assert parse_args(["--config", str(path), "--grpo.epsilon", "0.2"]).grpo.epsilon == 0.2


def test_cross_field_error_in_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "rollout:\n  gen_length: 64\n  block_length: 48\n")
    with pytest.raises(ConfigError, match=r"line 3: rollout.block_length=48 is not allowed; allowed: a divisor"):
        parse_args(["--config", str(path)])


def test_yaml_syntax_error_and_duplicate_key_report_the_line(tmp_path):
    path = _write(tmp_path, "grpo:\n  beta: 0.1\n  epsilon: [0.2\nrun:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml, line \d+: invalid YAML"):
        parse_args(["--config", str(path)])
    path = _write(tmp_path, "grpo:\n  beta: 0.1\n  beta: 0.2\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"dup.yaml, line 3: duplicate key grpo.beta \(first on line 2\)"):
        parse_args(["--config", str(path)])
    path = _write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_args(["--config", str(path)])
    path = _write(tmp_path, "grpo: 3\n", "scalar.yaml")
    with pytest.raises(ConfigError, match=r"scalar.yaml, line 1: grpo=3 is not allowed; allowed: a mapping"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    assert str(tmp_path / "missing.yaml") in str(info.value)  # the message names the path


def test_empty_yaml_file_is_the_preset(tmp_path):
    path = _write(tmp_path, "# nothing\n")
    assert parse_args(["--config", str(path)]) == resolve()


def test_preset_origin_reported_for_preset_values_made_invalid_by_a_flag():
    # gen_length from the flag, block_length from the preset: the error names the block length (and its origin).
    with pytest.raises(ConfigError, match=r"^preset 'llada-gsm8k': rollout.block_length=32 .*gen_length=48"):
        parse_args(["--preset", "llada-gsm8k", "--rollout.gen_length", "48"])


# ------------------------------------------------------------------------------------------------------ help text


def test_every_field_has_help_and_a_flag():
    from stp.methods import METHODS

    # Each method's help shows its own settings; together they show every field.
    text = "".join(C.build_parser({"method": name}).format_help() for name in METHODS)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{section}.{f.name} has no help text"
            assert f"--{section}.{f.name}" in text
    assert "(default: 0.2)" in text and "--preset NAME" in text and "d1-gsm8k" in text


def test_help_shows_the_presets_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--preset", "d1-gsm8k", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.5, from preset 'd1-gsm8k')" in out


def test_check_environment(tmp_path):
    TrainConfig().check_environment()
    with pytest.raises(ConfigError, match="run.data_path='nowhere.jsonl' is not allowed; allowed: an existing"):
        parse_args(["--run.data_path", "nowhere.jsonl", "--run.data_source", "file"]).check_environment()
    out = tmp_path / "afile"
    out.write_text("")
    with pytest.raises(ConfigError, match="run.output_dir"):
        parse_args(["--run.output_dir", str(out)]).check_environment()


# ------------------------------------------------------------------------------ sections found with the methods


def test_each_methods_section_is_in_its_module_and_after_the_shared_ones():
    from stp.methods import diffpo, dtrpo

    assert list(SECTIONS) == ["model", "rollout", "prior", "estimator", "grpo", "run", "diffpo", "dtrpo"]
    assert SECTIONS["diffpo"] is diffpo.DiffpoConfig and SECTIONS["dtrpo"] is dtrpo.DTRPOConfig
    assert diffpo.DiFFPO.sections == (diffpo.DiffpoConfig,) and dtrpo.DTRPO.sections == (dtrpo.DTRPOConfig,)
    assert resolve("diffpo-tiny").diffpo == diffpo.DiffpoConfig(mode="joint", gamma=0.5, nfe_penalty=0.2)


def _documented_method() -> str:
    """The smallest complete method of docs/architecture.md, with its own section, as a module's text."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    return re.search(r"```python\n# stp/methods/reinforce_d1.py\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def documented_method(tmp_path, monkeypatch):
    """The documented method added the way a user adds one: its module file in stp.methods' search path, found by
    the registry; nothing else changes."""
    import sys

    import stp.methods as registry

    (tmp_path / "reinforce_d1.py").write_text(_documented_method(), encoding="utf-8")
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "METHODS", registry._discover())
    yield registry.METHODS["reinforce-d1"]
    sys.modules.pop("stp.methods.reinforce_d1", None)


def test_a_new_methods_settings_appear_by_adding_only_its_module(documented_method, tmp_path, capsys):
    assert list(SECTIONS)[-1] == "reinforce" and SECTIONS["reinforce"] is documented_method.sections[0]
    with pytest.raises(SystemExit):
        parse_args(["--method", "reinforce-d1", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "reinforce: REINFORCE on d1's log-probs (method reinforce-d1)" in out
    assert "--reinforce.length_normalize [BOOL] divide each completion's log-prob by its number of tokens " \
           "(default: true)" in out
    assert "reinforce-d1 REINFORCE with group advantages" in out  # the methods list
    assert "--reinforce." not in C.build_parser().format_help()  # another method's help does not show it
    cfg = parse_args(["--method", "reinforce-d1", "--no-reinforce.length_normalize"])
    assert cfg.reinforce.length_normalize is False and cfg.to_dict()["reinforce"] == {"length_normalize": False}
    assert "reinforce" not in resolve().to_dict()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # config.yaml of a run reads back
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert parse_args(["--config", str(path)]) == cfg
    # Validation names the field, the value, what is allowed and where the value came from.
    path.write_text("method: reinforce-d1\nreinforce:\n  length_normalize: maybe\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 3: reinforce.length_normalize='maybe' is not allowed; "
                                          "allowed: true or false$"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"^command line --reinforce.length_normalize: reinforce.length_normalize is "
                                          r"a setting of method 'reinforce-d1' only; this run's method is 'stp'$"):
        parse_args(["--reinforce.length_normalize", "false"])


# ------------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_copied_recipe_given_with_config_resolves_as_the_preset(name, tmp_path):
    path = tmp_path / f"my-{name}.yaml"
    path.write_text(PRESETS[name].path.read_text(encoding="utf-8"), encoding="utf-8")
    copied, preset = parse_args(["--config", str(path)]), resolve(name)
    assert copied.preset == (PRESETS[name].extends or C.DEFAULT_PRESET)  # the values are layered on its parent
    copied.run.output_dir = preset.run.output_dir
    assert copied.to_dict() == {**preset.to_dict(), "preset": copied.preset}
    assert all(getattr(copied, s) == getattr(preset, s) for s in SECTIONS)


def _recipes(tmp_path, files: dict[str, str]):
    from stp.recipes import read_recipes

    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return lambda: read_recipes(tmp_path)


def test_recipes_extend_in_order_and_their_errors_name_the_file_and_line(tmp_path):
    read = _recipes(tmp_path, {
        "base.yaml": "description: the base\ngrpo:\n  beta: 0.0\n  epsilon: 0.3\n",
        "child.yaml": "description: a child\npreset: base\nmethod: d1\nnotes: [why]\ngrpo:\n  beta: 0.1\n",
        "index.txt": "# order\nchild\n",
    })
    got = read()
    assert list(got) == ["child", "base"]  # index.txt first, then the others alphabetically
    assert got["child"].overrides == {"grpo": {"beta": 0.1, "epsilon": 0.3}} and got["child"].method == "d1"
    assert (got["child"].extends, got["child"].notes, got["base"].method) == ("base", ("why",), "stp")
    (tmp_path / "child.yaml").write_text("description: a child\n\npreset: nowhere\n")
    with pytest.raises(ConfigError, match=r"child.yaml, line 3: preset='nowhere' is not allowed; allowed: another "
                                          "recipe of"):
        read()
    (tmp_path / "child.yaml").write_text("description: a child\npreset: base\n")
    (tmp_path / "base.yaml").write_text("description: the base\npreset: child\n")
    with pytest.raises(ConfigError, match=r"line 2: preset='(base|child)' is not allowed; allowed: another recipe of "
                                          r".* \(not one that extends this\)"):
        read()
    (tmp_path / "base.yaml").write_text("grpo:\n  beta: 0.0\n")
    with pytest.raises(ConfigError, match=r"base.yaml: description=None is not allowed; allowed: one line"):
        read()
    (tmp_path / "base.yaml").write_text("description: the base\n")
    (tmp_path / "index.txt").write_text("child\ngone\n")
    with pytest.raises(ConfigError, match=r"index.txt: preset='gone' is not allowed; allowed: the name of a recipe"):
        read()


def test_the_recipes_are_package_data():
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["stp.recipes"]
    files = [p.name for p in C.RECIPES.iterdir() if p.is_file() and p.suffix != ".py"]
    assert len(files) == len(PRESETS) + 1  # the recipes and index.txt
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)


def test_config_tools_help_documents_print_and_presets_table(capsys):
    with pytest.raises(SystemExit) as info:
        C.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m stp.config [-h] [--preset NAME] [--config FILE.yaml] [--section.field "
                          "VALUE ...] [--print | --presets-table]")
    assert "--print print the resolved configuration as YAML" in out
    assert "--presets-table print the presets as a Markdown table" in out
    assert "Check a training configuration" in out and "--grpo.epsilon" in out
    assert C.main(["--presets-table"]) == 0 and capsys.readouterr().out == C.presets_table()
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    train_help = capsys.readouterr().out
    assert "--print" not in train_help and train_help.startswith("usage: python -m stp.train")


@pytest.mark.parametrize("name, cache", [("diffpo-llada-gsm8k", "none"), ("diffpo-llada-countdown", "none"),
                                         ("elbo-gsm8k", "dual"), ("d1-math", "none")])
def test_llada_presets_choose_their_engine_and_say_why(name, cache):
    """Every LLaDA preset's rollout.cache is stated: STP and elbo use the dual cache, d1 decodes as published
    (uncached), DiFFPO keeps exact behaviour log-probs for its importance weights; the notes say so."""
    assert resolve(name).rollout.cache == cache
    notes = " ".join(PRESETS[name].notes)
    if name.startswith(("d1-", "diffpo-")):
        assert "rollout.cache none" in notes
