"""The reference sampler and the models against the official code's own trace (tests/fixtures/official-tiny).

The checkpoint was written by the official training code and the trace recorded every random draw
of the official samplers; replaying those draws must reproduce the official outputs.
"""

import dataclasses

import numpy as np
import pytest
from conftest import rel_err

torch = pytest.importorskip("torch")

from far_sdk.maths.noise import ReplayNoise  # noqa: E402
from training import FAR  # noqa: E402
from training.sampler import iter_reference  # noqa: E402

TOL = 1e-4  # the fixture README's fair tolerance (relative to the latents' scale); we measure ~1.3e-6


def _draws(ref, prefix, steps):
    out = []
    for s in range(steps):
        out.append(ref[f"{prefix}noise_x_T"][s][None])
        out.extend(ref[f"{prefix}noise_steps"][s, k][None] for k in range(ref[f"{prefix}noise_steps"].shape[1]))
    return out


def _tokens(img):  # [1, C, H, W] -> [L, C]
    return img.numpy()[0].transpose(1, 2, 0).reshape(-1, img.shape[1])


def test_nomask_sampler_reproduces_official(official_tiny_model, official_ref):
    ref = official_ref
    n = int(ref["num_sampling_steps"])
    steps = list(
        iter_reference(
            official_tiny_model,
            ref["labels"].tolist(),
            noise=ReplayNoise(_draws(ref, "", 10)),
            inner_steps=n,
            cfg=float(ref["cfg"]),
        )
    )
    assert len(steps) == 10 and [s.level for s in steps] == ref["levels"].astype(int).tolist()
    for s, st in enumerate(steps):
        assert rel_err(_tokens(st.raw), ref["raw_out"][s]) < TOL, f"inner loop output of step {s}"
        assert rel_err(_tokens(st.latents), ref["step_tokens"][s][0]) < TOL, f"tokens handed on by step {s}"
    assert rel_err(steps[-1].latents.numpy(), ref["final"]) < TOL


def test_mask_sampler_reproduces_official(official_tiny_model, official_ref):
    ref = official_ref
    model = FAR(dataclasses.replace(official_tiny_model.config, mask=True)).eval()
    model.load_state_dict(official_tiny_model.state_dict())
    steps = list(
        iter_reference(
            model,
            ref["labels"].tolist(),
            noise=ReplayNoise(_draws(ref, "mask_", 11), ref["mask_orders"]),
            inner_steps=int(ref["num_sampling_steps"]),
            cfg=float(ref["cfg"]),
            mode="mask",
        )
    )
    for s in range(10):
        assert rel_err(_tokens(steps[s].latents), ref["mask_tok_in"][s + 1][0]) < TOL, f"tokens entering step {s + 1}"
    assert rel_err(steps[-1].latents.numpy(), ref["mask_final"]) < TOL


def test_transformer_and_mlp_match_official_calls(official_tiny_model, official_ref):
    ref, m = official_ref, official_tiny_model
    with torch.no_grad():
        emb = m.cfg_class_embedding(torch.tensor(ref["tf_labels"]))
        np.testing.assert_array_equal(emb.numpy(), ref["tf_class_embedding"])
        np.testing.assert_allclose(
            m.forward_encoder(torch.tensor(ref["tf_tokens"]), emb).numpy(), ref["tf_encoder_out"], atol=1e-5
        )
        np.testing.assert_allclose(m.condition(torch.tensor(ref["tf_tokens"]), emb).numpy(), ref["tf_z"], atol=1e-5)
        net = m.diffloss.net
        x, t, c, lv = (torch.tensor(ref[k]) for k in ("mlp_x", "mlp_t", "mlp_c", "mlp_index"))
        np.testing.assert_allclose(net(x, t, c, lv).numpy(), ref["mlp_out"], atol=1e-6)
        np.testing.assert_allclose(net(x, t, c).numpy(), ref["mlp_out_noindex"], atol=1e-6)
        np.testing.assert_allclose(
            net.forward_with_cfg(x, t, c, lv, float(ref["mlp_cfg_scale"])).numpy(), ref["mlp_out_cfg"], atol=1e-6
        )
        # the folded form used by the fast paths agrees to float32 rounding
        np.testing.assert_allclose(
            net.forward_with_condition(x, t, net.condition(c, lv)).numpy(), ref["mlp_out"], atol=1e-5
        )


def test_training_loss_terms_match_official(official_tiny_model, official_ref):
    ref = official_ref
    with torch.no_grad():
        mse, vb = official_tiny_model.diffloss.loss_terms(
            *(torch.tensor(ref[k]) for k in ("loss_x0", "loss_t", "loss_noise", "loss_c", "loss_index"))
        )
    np.testing.assert_allclose(mse.numpy(), ref["loss_mse"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(vb.numpy(), ref["loss_vb"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose((mse + vb).numpy(), ref["loss_total"], rtol=1e-5)


def test_each_outer_step_condition_matches_official_z(official_tiny_model, official_ref):
    """Teacher-forced: feed the official tokens of each step; z must match the recorded transformer output."""
    ref, m = official_ref, official_tiny_model
    emb = m.cfg_class_embedding(torch.tensor(ref["labels"]))
    with torch.no_grad():
        for s in range(10):
            tok = torch.tensor(ref["tok_in"][s]).repeat(2, 1, 1)
            assert rel_err(m.condition(tok, emb).numpy(), ref["z"][s]) < 1e-5
