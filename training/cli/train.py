"""``gvr train autoencoder|generator|encoder|classifier``: the training stages of the method.

``autoencoder`` trains the generator and the encoder together (the demo bundle);
``generator`` (WGAN-GP) then ``encoder`` is the paper's two-stage route.

Each stage writes a folder (``--out``) holding safetensors weights, a
``state.json``, a JSON-lines metrics log and PNG loss plots; ``--resume``
continues from the checkpoint found there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from node.cli.common import HelpFormatter

_FMT = HelpFormatter


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, metrics, plots)")
    group.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train")
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    group.add_argument("--workers", type=int, default=1, help="processes that render phantoms")
    group.add_argument("--threads", type=int, default=0,
                       help="torch CPU threads (0: torch's default; 1 is fastest on a busy shared machine)")
    group.add_argument("--cache", type=Path, default=None,
                       help="folder for a .npy cache of preprocessed images (reused by later stages)")


def _data_help() -> str:
    return "image folder (searched recursively: DICOM, PNG, JPEG) or phantoms:START-END[@SIZE]"


def _architecture(p: argparse.ArgumentParser, resolution: int, latent: int, networks: str) -> None:
    """The architecture options of the stages that build a generator (``networks`` names who gets --channels)."""
    arch = p.add_argument_group("architecture")
    arch.add_argument("--resolution", type=int, default=resolution, choices=(32, 64, 128, 256),
                      help="model image side (px)")
    arch.add_argument("--latent", type=int, default=latent, help="latent size")
    arch.add_argument("--channels", type=int, default=16, help=f"width of the full-resolution layers ({networks})")
    arch.add_argument("--max-channels", type=int, default=256, help="widest layer")


def _add_generator(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("generator", help="WGAN-GP on unlabelled images", formatter_class=_FMT)
    p.add_argument("--data", required=True, help=_data_help())
    _architecture(p, resolution=64, latent=100, networks="G and critic")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=5000, help="generator updates (total, also with --resume)")
    opt.add_argument("--batch", type=int, default=64, help="images per batch")
    opt.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate (generator and critic)")
    opt.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    opt.add_argument("--beta2", type=float, default=0.9, help="Adam beta2")
    opt.add_argument("--critic-steps", type=int, default=2, help="critic updates per generator update")
    opt.add_argument("--gp", type=float, default=10.0, help="gradient-penalty weight")
    opt.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    _common(p)


def _add_autoencoder(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("autoencoder", help="generator and encoder trained together (writes OUT/generator, "
                       "OUT/encoder)", formatter_class=_FMT)
    p.add_argument("--data", required=True, help=_data_help())
    _architecture(p, resolution=128, latent=128, networks="G and E")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=3000, help="updates (total, also with --resume)")
    opt.add_argument("--batch", type=int, default=32, help="images per batch")
    opt.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate at the start (cosine decay)")
    opt.add_argument("--final-lr", type=float, default=1e-4, help="learning rate at the last step")
    opt.add_argument("--ssim-weight", type=float, default=0.5, help="weight of 1 - SSIM beside the L1 loss")
    opt.add_argument("--latent-noise", type=float, default=0.1,
                     help="noise added to E(x) before decoding, relative to the latent's scale")
    opt.add_argument("--prior-weight", type=float, default=1e-3, help="weight of mean(z^2)")
    opt.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    _common(p)


def _add_encoder(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("encoder", help="invert a trained generator", formatter_class=_FMT)
    p.add_argument("--generator", type=Path, required=True, help="folder of `gvr train generator`")
    p.add_argument("--data", required=True, help=_data_help())
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=2000, help="encoder updates (total, also with --resume)")
    opt.add_argument("--batch", type=int, default=64, help="images (and latent samples) per batch")
    opt.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    opt.add_argument("--channels", type=int, default=32, help="width of the encoder's full-resolution layer")
    opt.add_argument("--latent-weight", type=float, default=1.0, help="weight of mean (E(G(z)) - z)^2")
    opt.add_argument("--image-weight", type=float, default=1.0, help="weight of mean |G(E(x)) - x|")
    opt.add_argument("--norm-weight", type=float, default=0.0, help="weight of the latent-norm term")
    opt.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    _common(p)


def _add_classifier(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("classifier", help="latent model on a labelled set", formatter_class=_FMT)
    p.add_argument("--labels", required=True, help="CSV (columns path, bnp) or phantoms:START-END[@SIZE]")
    p.add_argument("--encoder", type=Path, required=True, help="folder of `gvr train encoder`")
    p.add_argument("--generator", type=Path, required=True, help="folder of `gvr train generator`")
    p.add_argument("--threshold", type=float, default=100.0, help="BNP (ng/L) at or above which label = 1")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--val-fraction", type=float, default=0.2, help="stratified validation share")
    opt.add_argument("--epochs", type=int, default=600, help="full-batch epochs per candidate")
    opt.add_argument("--kinds", default="mlp", help="candidates, comma-separated: mlp, logistic")
    opt.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP candidates")
    opt.add_argument("--latent-noise", type=float, default=1.0,
                     help="training noise on the latents, in per-dimension standard deviations (0: none); keeps "
                          "the classifier flat along directions the decoder barely draws")
    opt.add_argument("--twins", action="store_true",
                     help="the labelled set has healthy twins (phantoms, or a CSV with a twin column): add them "
                          "to the training part as negatives")
    opt.add_argument("--alignment-weight", type=float, default=0.0,
                     help="with --twins: weight of the term that makes -grad f point from each training positive "
                          "to its twin (0: off)")
    opt.add_argument("--overfit", action="store_true",
                     help="also fit the paper's control: a deliberately overfitted wide MLP")
    opt.add_argument("--overfit-epochs", type=int, default=3000, help="epochs of the overfitted control")
    opt.add_argument("--overfit-hidden", type=int, default=512, help="width of the control's two hidden layers")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvr train", description=__doc__, formatter_class=_FMT)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _add_autoencoder(sub)
    _add_generator(sub)
    _add_encoder(sub)
    _add_classifier(sub)
    return parser


def _run_generator(args: argparse.Namespace) -> dict[str, object]:
    from inference.models import ArchitectureConfig
    from training.data import load_unlabelled
    from training.progress import resolve_device
    from training.train_generator import GeneratorTraining, train_generator

    arch = ArchitectureConfig(resolution=args.resolution, latent_dim=args.latent, generator_channels=args.channels,
                              critic_channels=args.channels, max_channels=args.max_channels)
    cfg = GeneratorTraining(architecture=arch, steps=args.steps, batch=args.batch, lr=args.lr, beta1=args.beta1,
                            beta2=args.beta2, critic_steps=args.critic_steps, gp=args.gp, seed=args.seed,
                            checkpoint_every=args.checkpoint_every)
    device = resolve_device(args.device)
    images = load_unlabelled(args.data, arch.resolution, args.cache, args.workers)
    return train_generator(images, cfg, args.out, args.resume, device, f"{args.data} ({len(images)} images)")


def _run_autoencoder(args: argparse.Namespace) -> dict[str, object]:
    from inference.models import ArchitectureConfig
    from training.data import load_unlabelled
    from training.progress import resolve_device
    from training.train_autoencoder import AutoencoderTraining, train_autoencoder

    arch = ArchitectureConfig(resolution=args.resolution, latent_dim=args.latent, generator_channels=args.channels,
                              encoder_channels=args.channels, critic_channels=args.channels,
                              max_channels=args.max_channels, generator_body="upsample")
    cfg = AutoencoderTraining(architecture=arch, steps=args.steps, batch=args.batch, lr=args.lr,
                              final_lr=args.final_lr, ssim_weight=args.ssim_weight, latent_noise=args.latent_noise,
                              prior_weight=args.prior_weight, seed=args.seed, checkpoint_every=args.checkpoint_every)
    device = resolve_device(args.device)
    images = load_unlabelled(args.data, arch.resolution, args.cache, args.workers)
    return train_autoencoder(images, cfg, args.out, args.resume, device, f"{args.data} ({len(images)} images)")


def _run_encoder(args: argparse.Namespace) -> dict[str, object]:
    from training.data import load_unlabelled
    from training.progress import resolve_device
    from training.train_encoder import EncoderTraining, train_encoder
    from training.train_generator import load_generator

    cfg = EncoderTraining(steps=args.steps, batch=args.batch, lr=args.lr, channels=args.channels,
                          latent_weight=args.latent_weight, image_weight=args.image_weight,
                          norm_weight=args.norm_weight, seed=args.seed, checkpoint_every=args.checkpoint_every)
    device = resolve_device(args.device)
    generator = load_generator(args.generator, device)
    images = load_unlabelled(args.data, generator.config.resolution, args.cache, args.workers)
    return train_encoder(images, generator, cfg, args.out, args.resume, device, str(args.generator))


def _run_classifier(args: argparse.Namespace) -> dict[str, object]:
    import numpy as np
    import torch

    from training.data import load_labelled
    from training.evaluate import latents_of
    from training.progress import resolve_device
    from training.train_classifier import (
        ClassifierTraining,
        overfit_classifier,
        save_classifier,
        select_classifier,
    )
    from training.train_encoder import load_encoder
    from training.train_generator import load_generator

    device = resolve_device(args.device)
    encoder = load_encoder(args.encoder, device)
    generator = load_generator(args.generator, device)
    if generator.config.latent_dim != encoder.config.latent_dim:
        raise ValueError(f"encoder latent {encoder.config.latent_dim} != generator latent "
                         f"{generator.config.latent_dim}")
    if args.alignment_weight > 0 and not args.twins:
        raise ValueError("--alignment-weight needs --twins (the way from each positive to its healthy twin)")
    cache = args.out / "latents.npz"
    saved = np.load(cache, allow_pickle=False) if args.resume and cache.is_file() else None
    if saved is not None and (not args.twins or len(saved.get("twins", ())) > 0):
        z, bnp = torch.from_numpy(saved["z"]), saved["bnp"]
        twins = torch.from_numpy(saved["twins"]) if args.twins else None
    else:
        data = load_labelled(args.labels, encoder.config.resolution, args.threshold, args.workers, args.twins)
        z, bnp = latents_of(encoder, data.images).cpu(), data.bnp
        twins = latents_of(encoder, data.twins).cpu() if data.twins is not None else None
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(cache, z=z.numpy(), bnp=bnp, twins=twins.numpy() if twins is not None else np.zeros((0,)))
    labels = bnp >= args.threshold
    cfg = ClassifierTraining(val_fraction=args.val_fraction, epochs=args.epochs, seed=args.seed,
                             overfit_epochs=args.overfit_epochs, overfit_hidden=args.overfit_hidden,
                             kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                             mlp_hidden=args.hidden, latent_noise=args.latent_noise, twin_negatives=args.twins,
                             alignment_weight=args.alignment_weight)
    extra = {"kind": "classifier", "bnp_threshold": args.threshold, "data": f"{args.labels} ({len(bnp)} images, "
             f"{int(labels.sum())} with BNP >= {args.threshold:g})", "config": cfg.to_dict(),
             "encoder": str(args.encoder), "generator": str(args.generator), "step": 1}
    model, summary = select_classifier(z, labels, cfg, twins)
    save_classifier(args.out, model, summary, "classifier", extra)
    result: dict[str, object] = {"kind": summary["kind"], "val_auc": summary["val_auc"],
                                 "decision_threshold": summary["decision_threshold"]}
    if args.overfit:
        overfit, overfit_summary = overfit_classifier(z, labels, cfg)
        save_classifier(args.out, overfit, overfit_summary, "overfit_classifier", extra)
        result["overfit_val_auc"] = overfit_summary["val_auc"]
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    runners = {"autoencoder": _run_autoencoder, "generator": _run_generator, "encoder": _run_encoder, "classifier": _run_classifier}
    started = time.monotonic()
    try:
        result = runners[args.stage](args)
    except (ValueError, OSError) as exc:
        print(f"gvr train {args.stage}: {exc}", file=sys.stderr)
        return 2
    result = {**result, "wall_seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
