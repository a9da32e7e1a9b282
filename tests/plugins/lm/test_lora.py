"""LoRA fine-tuning through peft (recipes/finetune/lora.yaml): only the adapter and the image words' rows train, the
base stays bit for bit, and the export is a plain Hugging Face folder (merged) or peft's adapter folder."""

import csv
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from tarkit.cli import main
from tarkit.cpu_linear import CPULinear, use_cpu_linears
from tarkit_plugins.lm.lora import LoRA, image_word_ids
from tarkit_plugins.lms import HFCausalLM
from tarkit_plugins.pipelines import ImageToTextPipeline, TextToImagePipeline
from tests.tiny_parts import tiny_tatok

ROOT = Path(__file__).resolve().parents[3]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
ADAPTER_KEYS = ("lora_A", "lora_B", "trainable_tokens_delta")


@pytest.fixture(scope="module")
def tatok_dir(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_tatok().save_pretrained(tmp_path_factory.mktemp("tatok"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A small Tar LM folder (image words already in), the base to fine-tune."""
    torch.manual_seed(0)
    lm = HFCausalLM(preset="tiny", tokenizer="bytes", config=SMALL, num_codes=32, num_scales=3)
    return lm.save_pretrained(tmp_path_factory.mktemp("base"))


def lora_fit(base_dir, tatok_dir, out: Path, *extra: str) -> Path:
    """Four steps of the tiny LM recipe with the LoRA layer, batches of 8; returns the output folder."""
    main(["fit", "--config", str(ROOT / "recipes/tiny/lm.yaml"), "--config", str(ROOT / "recipes/finetune/lora.yaml"),
          f"--model.init_args.lm.init_args.pretrained={base_dir}", f"--model.init_args.tatok={tatok_dir}",
          f"--model.init_args.export_dir={out / 'export'}", f"--trainer.default_root_dir={out / 'run'}",
          "--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
          "--model.init_args.warmup_steps=0", "--data.init_args.train_size=8", "--data.init_args.batch_size=8",
          *extra])
    return out


@pytest.fixture(scope="module")
def merged_run(base_dir, tatok_dir, tmp_path_factory):
    return lora_fit(base_dir, tatok_dir, tmp_path_factory.mktemp("merged"))


def trained_lm(base_dir, run: Path, lora: LoRA) -> HFCausalLM:
    """The fine-tuned LM as it was in training (adapter unmerged), from the run's last checkpoint."""
    lm = HFCausalLM(pretrained=str(base_dir), lora=lora)
    state = torch.load(run / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")})
    return lm.eval()


def tokens(lm: HFCausalLM) -> torch.Tensor:
    vocab = lm.vocab
    return torch.tensor([[5, 9, vocab.im_start, vocab.scale_ids[1], vocab.image_start + 3, vocab.image_end - 1,
                          vocab.im_end, 12]])


def test_lora_fit_trains_only_the_adapter_and_the_image_rows(merged_run, base_dir):
    with (merged_run / "run" / "csv" / "version_0" / "metrics.csv").open() as file:
        losses = [float(row["train/loss"]) for row in csv.DictReader(file) if row["train/loss"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))  # (each step draws other tasks)

    state = torch.load(merged_run / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = state["state_dict"]
    base = load_file(str(base_dir / "model.safetensors"))
    base.setdefault("lm_head.weight", base["model.embed_tokens.weight"])  # tied: saved once
    frozen = {k: v for k, v in state.items() if k.startswith("lm.") and not any(a in k for a in ADAPTER_KEYS)}
    assert "lm.model.model.embed_tokens.token_adapter.base_layer.weight" in frozen and len(frozen) > 20
    for key, value in frozen.items():  # peft's names: q_proj.base_layer.weight, embed_tokens.token_adapter...
        name = key.removeprefix("lm.model.").replace("base_layer.", "").replace("token_adapter.", "")
        if "trainable_tokens_original" not in name:
            assert torch.equal(value, base[name]), name  # the base, bit for bit
    trained = {k: v for k, v in state.items() if any(a in k for a in ADAPTER_KEYS)}
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # B starts at zero
    rows = state["lm.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    lm = HFCausalLM(pretrained=str(base_dir))
    assert rows.shape == (len(image_word_ids(lm.vocab)), SMALL["hidden_size"])
    assert not torch.equal(rows, base["model.embed_tokens.weight"][image_word_ids(lm.vocab)])


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_reach_the_adapter_and_the_image_rows_alone_and_the_loss_falls(tied):
    torch.manual_seed(0)
    lm = HFCausalLM(preset="tiny", tokenizer="bytes", config={**SMALL, "tie_word_embeddings": tied}, num_codes=8,
                    lora=LoRA(r=4, target_modules=["q_proj", "down_proj"]))
    use_cpu_linears(lm)  # as TarkitModule.setup does: peft's base layers and factors become CPULinear
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj.base_layer, CPULinear)
    ids = tokens(lm)
    hidden = lm.hidden_states(ids)
    loss = torch.nn.functional.cross_entropy(lm.output_head(hidden)[0, :-1], ids[0, 1:])
    loss.backward()
    with_grad = {n for n, p in lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert with_grad <= trainable and all(any(a in n for a in ADAPTER_KEYS) for n in trainable)
    row_params = {n for n in with_grad if "trainable_tokens_delta" in n}
    assert len(row_params) == (1 if tied else 2)  # tied: one row block for embedding and head; untied: one each
    assert any("lora_B" in n for n in with_grad)  # (A's gradient is zero at the start: it goes through B = 0)
    # The head tarkit reads is an nn.Linear whose weight has the trained rows written in: equal logits.
    assert torch.allclose(lm.output_head(hidden), lm(ids), atol=1e-5)

    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):  # one fixed batch
        loss = torch.nn.functional.cross_entropy(lm.output_head(lm.hidden_states(ids))[0, :-1], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_merged_export_is_a_plain_folder_equal_to_the_adapter_model(merged_run, base_dir, tatok_dir):
    export = merged_run / "export"
    assert not (export / "adapter_config.json").exists()
    trained = trained_lm(base_dir, merged_run, LoRA())
    plain = Qwen2ForCausalLM.from_pretrained(export).eval()
    ids = tokens(trained)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, trained(ids), atol=1e-5)
        assert not torch.allclose(plain(input_ids=ids).logits, HFCausalLM(pretrained=str(base_dir)).eval()(ids))
    generator = torch.Generator().manual_seed(0)
    codes = TextToImagePipeline(str(export)).generate_codes(["a red circle"], generator=generator)
    assert codes[0].shape == (36,)


def test_adapter_export_reloads_through_peft_and_tarkit(base_dir, tatok_dir, tmp_path):
    run = lora_fit(base_dir, tatok_dir, tmp_path, "--model.init_args.lm.init_args.lora.save=adapter",
                   "--model.init_args.lm.init_args.lora.target_modules=[q_proj,v_proj]")
    export = tmp_path / "export"
    assert (export / "adapter_config.json").is_file() and not (export / "config.json").exists()
    assert (export / "adapter_model.safetensors").stat().st_size < (base_dir / "model.safetensors").stat().st_size
    trained = trained_lm(base_dir, run, LoRA(target_modules=["q_proj", "v_proj"], save="adapter"))
    ids = tokens(trained)
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export).eval()
    with torch.no_grad():
        expected = trained(ids)
        assert torch.allclose(with_peft(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(HFCausalLM(pretrained=str(export)).eval()(ids), expected, atol=1e-5)  # merged on load
    answer = ImageToTextPipeline(str(export)).generate(torch.rand(3, 64, 64), "What is it?", max_new_tokens=3)
    assert isinstance(answer, str)


@pytest.mark.parametrize(("lora", "message"), [
    (LoRA(r=0), r"lora.r must be a positive integer \(the adapter rank, e.g. 16\), got 0"),
    (LoRA(target_modules=["q_prj"]), r"lora.target_modules \['q_prj'\] match no module of Qwen2ForCausalLM; its "
                                     r"linear layers are named \[.*'q_proj'.*\], or use 'all-linear'"),
    (LoRA(target_modules=["lm_head"]), "must not include the output head 'lm_head'"),
    (LoRA(save="adapter"), "lora.save='adapter' needs pretrained= a folder that already has the image words"),
    (LoRA(save="delta"), "lora.save must be one of merged, adapter, got 'delta'"),
])
def test_bad_lora_settings_are_one_line_errors(lora, message):
    with pytest.raises(ValueError, match=message) as info:
        HFCausalLM(preset="tiny", tokenizer="bytes", config=SMALL, lora=lora)
    assert "\n" not in str(info.value)


def test_a_bad_rank_in_a_recipe_is_a_cli_error(base_dir, tatok_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_fit(base_dir, tatok_dir, tmp_path, "--model.init_args.lm.init_args.lora.r=-1")
    assert exit_info.value.code == 2
    assert "lora.r must be a positive integer" in capsys.readouterr().err
