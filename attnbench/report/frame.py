"""Records flattened into one pandas row per case."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

MIB = 2**20


def _row(record: dict[str, Any]) -> dict[str, Any]:
    case, metrics = record["case"], record.get("metrics", {})
    latency, flops = metrics.get("latency", {}), metrics.get("flops", {})
    memory, roofline = metrics.get("memory", {}), metrics.get("roofline", {})
    batch = case["batch"]
    return {
        "id": record["id"], "kind": case.get("kind", "attention"), "paper": case.get("paper"),
        "label": case["label"], "mechanism": case["mechanism"],
        "options": json.dumps(case["options"], sort_keys=True), "shape": case["shape"],
        "height": case["height"], "width": case["width"], "tokens": case["height"] * case["width"],
        "dim": case["dim"], "heads": case["heads"], "batch": batch, "dtype": case["dtype"], "mode": case["mode"],
        "device": case["device"], "status": record["status"], "message": record.get("message", ""),
        "params": metrics.get("params"),
        "analytic_gmacs_per_image": flops["analytic_macs"] / batch / 1e9 if "analytic_macs" in flops else None,
        "counted_gflops_per_image": flops["counted_flops"] / batch / 1e9 if "counted_flops" in flops else None,
        "keys_per_query": flops.get("keys_per_query"), "density": flops.get("density"),
        "median_ms": latency["median_s"] * 1e3 if latency else None,
        "iqr_ms": latency["iqr_s"] * 1e3 if latency else None,
        "samples": latency.get("n"), "converged": latency.get("converged"),
        "images_per_s": latency.get("images_per_s"),
        "peak_mib": memory["peak_bytes"] / MIB if "peak_bytes" in memory else None,
        "activation_mib": memory["activation_bytes"] / MIB if "peak_bytes" in memory else None,
        "fraction_of_gemm": roofline.get("fraction_of_gemm"),
        "task": (case.get("task") or {}).get("task"),
        "dataset": ((case.get("task") or {}).get("data") or {}).get("dataset"),
        **_accuracy(metrics.get("accuracy")),
    }


def _accuracy(accuracy: dict[str, Any] | None) -> dict[str, Any]:
    if not accuracy:
        return {}
    final, data = accuracy["final"], accuracy["data"]
    return {"top1": final.get("top1"), "top5": final.get("top5"), "miou": final.get("miou"),
            "pixel_accuracy": final.get("pixel_accuracy"), "epochs": len(accuracy["history"]),
            "train_images": data["train"]["images"], "val_images": data["val"]["images"],
            "train_minutes": accuracy["train_seconds"] / 60}


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per case, in the order the records were written."""
    return pd.DataFrame([_row(record) for record in records])
