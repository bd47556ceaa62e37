"""The metrics the OOD and open-set papers report, as they define them (issue 17): AUROC, AUPR-In,
AUPR-Out and FPR@95TPR with the unseen (OOD) side positive, OSCR and CCR at fixed FPRs
(Dhamija et al. 2018), top-5 accuracy; checked against pytorch-ood on the same scores and
against the definitions, and reported by ``hybridcls evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridcls.cli import main
from hybridcls.errors import InputError
from hybridcls.eval.metrics import top_k_accuracy
from hybridcls.gate.metrics import CCR_FPRS, gate_detection, open_set_classification


def _case(seed: int, n_seen: int = 300, n_unseen: int = 200, decimals: int = 1):
    """Gate scores with many ties (rounded) and overlap, and closed-set correctness."""
    rng = np.random.default_rng(seed)
    scores = np.round(np.concatenate([rng.normal(0.0, 1.0, n_seen), rng.normal(1.2, 1.0, n_unseen)]),
                      decimals)
    is_unseen = np.r_[np.zeros(n_seen, bool), np.ones(n_unseen, bool)]
    # seen images with a low score are more often right, as with a real classifier
    correct = rng.random(n_seen + n_unseen) < 1 / (1 + np.exp(scores - 0.5))
    return scores, correct, is_unseen


def _ccr_by_definition(scores, correct, is_unseen, fpr):
    """Dhamija et al.'s operating points, every threshold tau tried: accept s <= tau; the best CCR
    (correct seen images accepted / seen images) whose FPR (unseen accepted / unseen) <= fpr."""
    seen, unseen = ~is_unseen, is_unseen
    best = 0.0
    for tau in np.r_[-np.inf, np.unique(scores)]:
        accepted = scores <= tau
        if (accepted & unseen).sum() <= fpr * unseen.sum() + 1e-9:
            best = max(best, (accepted & seen & correct).sum() / seen.sum())
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_pytorch_ood_on_the_same_scores(seed):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("pytorch_ood.metrics.functional")
    scores, correct, is_unseen = _case(seed)
    labels = torch.from_numpy(np.where(is_unseen, -1, 0))  # pytorch-ood: label < 0 is OOD
    preds = torch.from_numpy(np.where(correct, 0, 1))  # right iff equal to the label 0
    s = torch.from_numpy(scores)
    det = gate_detection(scores, is_unseen)
    assert det.auroc == pytest.approx(float(F.auroc(s, labels)), abs=1e-6)
    assert det.aupr_in_trapezoid == pytest.approx(float(F.aupr(s, labels, positive="id")), abs=1e-6)
    assert det.aupr_out_trapezoid == pytest.approx(float(F.aupr(s, labels, positive="ood")), abs=1e-6)
    assert det.fpr_at_tpr_unseen_positive == pytest.approx(float(F.fpr_at_tpr(s, labels, 0.95)), abs=1e-6)
    osc = open_set_classification(scores, correct, is_unseen)
    assert osc.oscr == pytest.approx(F.oscr_score(s, preds, labels), abs=1e-6)
    assert osc.closed_set_accuracy == pytest.approx(float(F.accuracy(preds, labels)), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 3])
def test_ccr_at_fpr_is_the_best_operating_point_within_the_fpr(seed):
    # 1000 unseen images: FPR 1e-1 and 1e-2 are whole numbers of images (the boundary counts),
    # 1e-3 is one image, 1e-4 none
    scores, correct, is_unseen = _case(seed, n_seen=500, n_unseen=1000, decimals=2)
    osc = open_set_classification(scores, correct, is_unseen)
    assert list(osc.ccr_at_fpr) == ["0.1", "0.01", "0.001", "0.0001"]
    for fpr in CCR_FPRS:
        assert osc.ccr_at_fpr[f"{fpr:g}"] == pytest.approx(
            _ccr_by_definition(scores, correct, is_unseen, fpr), abs=1e-12)
    # the area is at most the closed-set accuracy, reached by a perfect gate
    assert osc.oscr <= osc.closed_set_accuracy
    perfect = open_set_classification(is_unseen.astype(float), correct, is_unseen)
    assert perfect.oscr == pytest.approx(perfect.closed_set_accuracy)
    assert perfect.ccr_at_fpr["0.0001"] == pytest.approx(perfect.closed_set_accuracy)


def test_oscr_of_a_constant_score_is_half_the_accuracy():
    # every image tied: the curve is one diagonal from (0, 0) to (1, accuracy)
    osc = open_set_classification([0.5] * 6, [1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1])
    assert osc.closed_set_accuracy == 0.75 and osc.oscr == pytest.approx(0.375)
    assert osc.ccr_at_fpr["0.1"] == 0.0  # accepting any image accepts every unseen one


def test_open_set_inputs_are_checked():
    with pytest.raises(InputError, match="needs both seen and unseen images"):
        open_set_classification([0.1, 0.2], [1, 1], [0, 0])
    with pytest.raises(InputError, match=r"correct has shape \(1,\) for scores of shape \(2,\)"):
        open_set_classification([0.1, 0.2], [1], [0, 1])
    with pytest.raises(InputError, match=r"fprs=5: expected a rate in \(0, 1\]"):
        open_set_classification([0.1, 0.2], [1, 1], [0, 1], fprs=[5])
    with pytest.raises(InputError, match="scores contains 1 NaN value"):
        open_set_classification([0.1, float("nan")], [1, 1], [0, 1])
    # no seen image classified right: the curve lies on CCR = 0
    assert open_set_classification([0.1, 0.2], [0, 1], [0, 1]).oscr == 0.0


def test_top_k_accuracy():
    truth = ["fox", "elk", "owl", "bat"]
    ranked = [["elk", "fox"], ["elk", "fox"], ["fox", "bat"], None]  # None: an error row, wrong
    assert top_k_accuracy(truth, ranked, k=1) == 0.25
    assert top_k_accuracy(truth, ranked, k=2) == 0.5
    with pytest.raises(InputError, match=r"ranked\[0\] lists 2 classes; top-3 accuracy needs 3"):
        top_k_accuracy(truth, ranked, k=3)
    with pytest.raises(InputError, match="y_true has 1 labels but ranked 2 rankings"):
        top_k_accuracy(["fox"], [["fox"], ["elk"]], k=1)


def _write_predictions(tmp_path, scores, correct, is_unseen):
    """A hybrid's JSON Lines predictions: seen classes s0..s5, unseen u0..u1; every row ranks 6
    classes with the true one 1st, 3rd or 7th (not in the top 6), by the row's position."""
    seen = [f"s{i}" for i in range(6)]
    unseen = ["u0", "u1"]
    classes = seen + unseen
    rows, labels = [], ["image_id,label"]
    n_in = {1: 0, 5: 0}
    for i, (g, right, un) in enumerate(zip(scores, correct, is_unseen, strict=True)):
        truth = unseen[i % 2] if un else seen[i % 6]
        others = [c for c in classes if c != truth]
        rank = (0, 2, 7)[i % 3]
        ranked = (others[:rank] + [truth] + others[rank:])[:6]
        n_in[1] += rank == 0
        n_in[5] += rank < 5
        sup_top = truth if (right and not un) else next(c for c in seen if c != truth)
        rows.append({"path": f"img{i}.png", "label": ranked[0], "score": 0.5, "branch": "supervised",
                     "status": "ok", "error": None,
                     "topk": [{"label": c, "score": round(0.5 / (k + 1), 6)} for k, c in enumerate(ranked)],
                     "gate_score": float(g), "gate_weight": 0.0,
                     "supervised_topk": [[sup_top, 0.9]], "zeroshot_topk": []})
        labels.append(f"img{i}.png,{truth}")
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lab = tmp_path / "labels.csv"
    lab.write_text("\n".join(labels) + "\n", encoding="utf-8")
    seen_file = tmp_path / "seen.txt"
    seen_file.write_text("\n".join(seen) + "\n", encoding="utf-8")
    return pred, lab, seen_file, n_in


def test_evaluate_reports_them_in_metrics_json(tmp_path, capsys):
    scores, correct, is_unseen = _case(4, n_seen=60, n_unseen=30)
    pred, lab, seen, n_in = _write_predictions(tmp_path, scores, correct, is_unseen)
    out = tmp_path / "metrics"
    assert main(["evaluate", str(pred), "--labels", str(lab), "--seen-classes", str(seen),
                 "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    n = len(scores)
    assert metrics["scores"]["accuracy"] == pytest.approx(n_in[1] / n)
    assert metrics["top5_accuracy"] == pytest.approx(n_in[5] / n)
    expected = open_set_classification(scores, correct, is_unseen)
    assert metrics["open_set"] == expected.as_dict()  # JSON keeps a float's every digit
    assert metrics["gate"]["auroc"] == pytest.approx(gate_detection(scores, is_unseen).auroc)
    assert f"top-5 accuracy {100 * n_in[5] / n:.2f}%" in summary
    assert f"OSCR {expected.oscr:.4f}" in summary and "CCR at FPR 0.1 " in summary


def test_evaluate_says_why_there_is_no_top5(tmp_path, capsys):
    scores, correct, is_unseen = _case(5, n_seen=12, n_unseen=6)
    pred, lab, seen, _ = _write_predictions(tmp_path, scores, correct, is_unseen)
    rows = [json.loads(line) for line in pred.read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["topk"] = r["topk"][:3]  # predict --topk 3
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "m"
    assert main(["evaluate", str(pred), "--labels", str(lab), "--seen-classes", str(seen),
                 "-o", str(out)]) == 0
    assert "top-5 accuracy n/a: the predictions rank 3 classes per row (predict --topk 5)" in \
        capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["top5_accuracy"] is None
