"""Why AlphaEdit's single edits fail on a family, on TRAIN records. Prints; asserts nothing.

    python benchmarks/alphaedit_diagnose.py [--backbone tiny_llava] [--edits 30] [--k0 1000]

With the composed ``editor=alphaedit backbone=<family>`` settings and K0 from ``--k0`` other train
records (as benchmarks/alphaedit_settings.py): the null-space dimension and the spectrum of K0K0ᵀ/n
per layer, then per edit of the last ``--edits`` train records the target tokens and the model's
predictions, token accuracy and NLL before the edit, with the optimised target vector z alone
(before the solve: does δ reach the target?), and after the update; ‖δ‖/‖z₀‖; the share of δ the
update writes at the key position; and ‖Pk‖/‖k‖ of the edit's key per layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rows import load_train, train_edits_parser  # noqa: E402
from mmke.config import build  # noqa: E402
from mmke.editors.base import EditOutcome  # noqa: E402
from mmke.editors.nullspace import cached_second_moments  # noqa: E402
from mmke.editors.snapshot import only_trainable  # noqa: E402
from mmke.regularizers.base import edit_request  # noqa: E402
from mmke.regularizers.hidden import last_prompt_positions  # noqa: E402
from tests.conftest import compose_config  # noqa: E402


@torch.no_grad()
def scored(backbone, editor, batch, z: torch.Tensor | None = None) -> tuple[float, float, list]:
    """Token accuracy, NLL and predicted ids of the target, with z (if given) in place of the
    last edited layer's output at the key position."""
    position = int(last_prompt_positions(batch)[0])

    def put(hidden: torch.Tensor) -> torch.Tensor | None:
        if z is None:
            return None
        hidden = hidden.clone()
        hidden[0, position] = z.to(hidden.dtype)
        return hidden

    with editor._at_last_layer(put):
        logits = backbone.target_logits(batch, backbone.forward(batch).logits)
    targets = batch.target_ids()
    predicted = logits.argmax(-1)
    nll = torch.nn.functional.cross_entropy(logits.float(), targets)
    return float((predicted == targets).float().mean()), float(nll), predicted.tolist()


def main() -> None:
    parser = train_edits_parser(__doc__, backbone="tiny_llava")
    parser.add_argument("--k0", type=int, default=1000)
    args = parser.parse_args()
    backbone, source, train = load_train(args)
    edited, rest = train[-args.edits:], train[:-args.edits]
    node = compose_config(["editor=alphaedit", f"backbone={args.backbone}"]).editor
    editor = build(node, k0_records=args.k0, k0_data=[], progress=False)
    editor.attach(backbone, source.templates, train_records=lambda: rest)
    covs, _, _ = cached_second_moments(backbone, editor.k0_prompts(source.templates, lambda: rest),
                                       editor._layers, editor.cache_dir, editor.k0_batch_size,
                                       progress=False)
    for layer, cov in covs.items():
        ev = torch.linalg.eigvalsh(cov.double())
        null = int(torch.linalg.matrix_rank(editor.projectors[layer]))
        print(f"layer {layer}: null {null} of {len(ev)}; eigenvalues {ev[0]:.1e} .. "
              f"{ev[-1]:.1e}, median {ev.median():.1e}")
    decode = backbone.tokenizer.convert_ids_to_tokens
    rel = 0.0
    for record in edited:
        prompt = edit_request(record, source.templates).prompt
        batch = backbone.prepare([prompt])
        positions = last_prompt_positions(batch)
        acc0, nll0, predicted = scored(backbone, editor, batch)
        keys, z0 = editor._keys_and_outputs(batch, positions)
        outcome = EditOutcome()
        frozen = only_trainable(backbone.model, [])
        try:
            z = editor._target_vector(batch, outcome)
        finally:
            frozen.restore()
        assert z is not None
        acc_z, nll_z, _ = scored(backbone, editor, batch, z)
        delta = z - z0[0]
        kept = " ".join(f"{float((editor.projectors[layer] @ k[0]).norm() / k[0].norm()):.2f}"
                        for layer, k in keys.items())
        assert editor.edit([record]).ok
        acc1, nll1, _ = scored(backbone, editor, batch)
        written = float((editor._keys_and_outputs(batch, positions)[1][0] - z0[0]) @ delta
                        / delta.pow(2).sum().clamp_min(1e-12))
        editor.restore()
        rel += acc1
        print(f"{'FAIL' if acc1 < 1 else '    '} {decode(batch.target_ids().tolist())} "
              f"pred {decode(predicted)}: acc {acc0:.2f} -> z {acc_z:.2f} -> edit {acc1:.2f}; "
              f"nll {nll0:.2f} -> {nll_z:.3f} -> {nll1:.3f}; |δ|/|z0| "
              f"{float(delta.norm() / z0[0].norm()):.2f}; written {written:.2f}; |Pk|/|k| {kept}",
              flush=True)
    print(f"Rel {100 * rel / len(edited):.1f}")


if __name__ == "__main__":
    main()
