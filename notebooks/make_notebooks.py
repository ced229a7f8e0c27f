"""Writes the science notebooks (valid nbformat v4 JSON, no outputs).

Run from the repository root after changing a notebook's text:

    python notebooks/make_notebooks.py

Each notebook runs one experiment of ``jaxbandit.science`` at the "small"
scale (about a minute on 2 CPU cores), or at the "tiny" scale (seconds) when
the environment variable ``JAXBANDIT_NOTEBOOK_SMALL=1`` is set, as CI does
(``tests/test_science.py``). Results go to ``JAXBANDIT_NOTEBOOK_OUT`` if set,
else ``results/notebooks/NAME`` under the working directory.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''import os
from IPython.display import Image, display
from jaxbandit import science

scale = science.notebook_scale()  # "tiny" under JAXBANDIT_NOTEBOOK_SMALL=1 (CI), else "small"
out_root = os.environ.get("JAXBANDIT_NOTEBOOK_OUT", os.path.join("results", "notebooks"))
out = os.path.join(out_root, NAME)
print("scale:", scale, "->", out)'''

RUN = '''summary = science.run_named(NAME, out, scale=scale)
science.print_table(summary) if "curves" in summary else None
display(Image(os.path.join(out, FIGURE)))'''

NOTEBOOKS = [
    ("01_paper_users", "paper-users", "figure_publication.png",
     "# P1's personalized-users experiment\n\n"
     "Greedy exact ERM (known heads, Bradley-Terry feedback, current+reference slates) for "
     "U = 10, 50, 100 users. The left panel is the paper's figure; the right panel repeats it "
     "on a log round axis, where logarithmic growth is a straight rising line and bounded "
     "regret flattens. The legend gives each population's growth verdict from "
     "`jaxbandit.stats.summarize_growth` ('?' marks an inconclusive default verdict). The "
     "'small' scale here uses 20 contexts x 20 actions and 300 rounds; "
     "`jaxbandit run --preset paper-users` runs the paper size. See docs/experiments.md.",
     '''for pop in summary["populations"]:
    g = pop["growth"]
    print(pop["n_users"], "users:", g["verdict"], "conclusive" if g["conclusive"] else "inconclusive")
    print("   ", g["reason"][:300])'''),
    ("02_diversity_rank", "diversity-rank", "figure.png",
     "# Diversity: heads of rank r\n\n"
     "Heads confined to a rank-r subspace of the J = 10 latent directions, known-heads exact "
     "ERM, under current+reference slates and on-policy top-2 slates (one compiled sweep "
     "over the rank per slate policy). With the heads known to the learner, a rank-deficient "
     "population is a smaller estimation problem (PAPER.md section 5), so lower rank is "
     "expected to mean less regret, not more.",
     '''for e in summary["curves"]:
    print(f"{e['curve']:>34}  verdict {science.verdict_label(e['growth']):>13}  "
          f"relevant lambda_min {e['diversity']['relevant_min_eigenvalue']}")'''),
    ("03_offline_sample_complexity", "offline-sample-complexity", "figure.png",
     "# Offline sample complexity\n\n"
     "With reference-policy slates the estimate deployed at round t is exactly the ERM on "
     "t - 1 i.i.d. reference slates, so one online run gives G(R_hat_n) for every n. The "
     "figure shows P(G > 0) (Clopper-Pearson intervals) and mean G on semi-log axes; a "
     "straight line there is exponential decay, i.e. O(log 1/eps) samples for P(G>0) <= eps.",
     '''for e in summary["curves"]:
    d = e["probability_decay"]
    print(e["curve"], "rate", d["rate"], "interval", (d["rate_lower"], d["rate_upper"]),
          "window", d["window"])'''),
    ("04_temperature_zero_vs_kl", "temperature-zero-vs-kl", "figure.png",
     "# Temperature-zero versus KL-regularised regret\n\n"
     "On the same runs (record_kl=True): the cumulative temperature-zero regret of the greedy "
     "selector and the cumulative KL-regularised regret of the softened training policy "
     "pi_t ∝ pi0 exp(R_hat_t / beta), for beta in {0.1, 1} (one compiled sweep). P2's "
     "contrast: the first can be O(1) while the second is known only to be O(log T).",
     '''for e in summary["curves"]:
    print(e["curve"], e["verdict"], e["final_cumulative_regret"]["mean"])'''),
    ("05_personalized_vs_pooled", "personalized-vs-pooled", "figure.png",
     "# Personalized versus pooled learners\n\n"
     "Known-heads, per-user bilinear and pooled (one matrix for every user, misspecified) "
     "exact ERM on the same instance and the same seeds. A misspecified pooled learner "
     "keeps deploying the wrong response for users unlike the average, so its regret grows "
     "linearly.",
     '''for e in summary["curves"]:
    print(e["curve"], e["verdict"], e["tail_per_round_regret"]["mean"])'''),
]


def build(stem, name, figure, intro, extra):
  nb = new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.cells = [
      new_markdown_cell(intro),
      new_code_cell(f"NAME = {name!r}\nFIGURE = {figure!r}\n" + SETUP),
      new_code_cell(RUN),
      new_code_cell(extra),
  ]
  return nb


def main():
  for stem, name, figure, intro, extra in NOTEBOOKS:
    nb = build(stem, name, figure, intro, extra)
    nbformat.validate(nb)
    path = os.path.join(HERE, f"{stem}.ipynb")
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
  main()
