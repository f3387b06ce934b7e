"""Mutation check: cut each mechanism a verdict rests on and see a test fail (``make mutants``).

Each mutant replaces one line of ``fastmem`` (the mechanism) by a version without it, in a copy of
the repository, and runs the test file that guards it. A mutant that leaves its tests green is a
mechanism no test protects. ``tests/test_mutants.py`` checks, in every ``make test``, that each
mutant still applies to today's code, so this list cannot drift silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_BUILD = ROOT / "_build" / "ci"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: str


MUTANTS = (
    Mutant("every bootstrap interval collapsed to its mean", "fastmem/stats.py",
           "return float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail))",
           "return float(boot.mean()), float(boot.mean())", "tests/test_stats.py"),
    Mutant("cluster bootstrap ignores the units inside a cluster", "fastmem/stats.py",
           "return cluster_count[:, clusters] * unit_count[:, units]",
           "return cluster_count[:, clusters] * 1.0", "tests/test_stats.py"),
    Mutant("paired change reports its point as its interval", "fastmem/stats.py",
           "low, high = _percentiles(boot, level)", "low = high = float(point)", "tests/test_stats.py"),
    Mutant("a failed positive control no longer makes a null inconclusive", "fastmem/stats.py",
           "return INCONCLUSIVE if verdict in demotes and not control_passed else verdict",
           "return verdict", "tests/test_stats.py"),
    Mutant("a degenerate interval is accepted as certainty", "fastmem/verdicts.py",
           "if low >= high:  # a single point: a degenerate bootstrap, not certainty", "if False:",
           "tests/test_verdicts.py"),
    Mutant("timing ratio interval collapsed", "fastmem/benchmark.py",
           "low, high = stats.paired_bootstrap(lambda picks: 100 * (np.median(ratios[picks], axis=1) - 1),",
           "low = high = 100 * (np.median(ratios) - 1); (lambda picks: 100 * (np.median(ratios[picks], axis=1) - 1),",
           "tests/test_attractors.py"),
    Mutant("latent attention write without decay", "fastmem/latent/adapters.py",
           "torch.addmm(bank, a.T, v, beta=self.gamma)", "torch.addmm(bank, a.T, v)", "tests/test_latent.py"),
    Mutant("latent Hebbian write without decay", "fastmem/latent/adapters.py",
           "return self.gamma * bank + delta", "return bank + delta", "tests/test_latent.py"),
    Mutant("latent repaired write without centring", "fastmem/latent/adapters.py",
           "z = _rms(z - self.centre)", "z = z", "tests/test_latent.py"),
    Mutant("attractor strengths never decay", "fastmem/attractors.py",
           "(1 - cfg.decay) * self.strengths)", "self.strengths)", "tests/test_attractors.py"),
    Mutant("attractor gate removed", "fastmem/attractors.py",
           "weight = weight * (c >= cfg.gate_threshold).to(weight.dtype)", "pass", "tests/test_attractors.py"),
    Mutant("attractor burn-in removed", "fastmem/attractors.py",
           "f = self.feedback * active[:, None].to(self.feedback.dtype)", "f = self.feedback",
           "tests/test_attractors.py"),
    Mutant("attractor activation threshold removed", "fastmem/attractors.py",
           "activated = c >= cfg.activation_threshold", "activated = c >= -2", "tests/test_attractors.py"),
    Mutant("attractors never move towards the activation", "fastmem/attractors.py",
           "self.attractors = a + cfg.pull * act[..., None] * (x[:, None, :] - a)", "self.attractors = a",
           "tests/test_attractors.py"),
    Mutant("the stateless control keeps its state across passes", "fastmem/failure_modes.py",
           "self.reset(self.n_streams)", "pass", "tests/test_failure_modes.py"),
    Mutant("the unstable control never redraws its attractors", "fastmem/failure_modes.py",
           "self.attractors = random_attractors(x, self.config.n_attractors, self.generator)", "pass",
           "tests/test_failure_modes.py"),
    Mutant("snap-back counts pairs that never crossed", "fastmem/failure_modes.py",
           "crossed = int(sum(s[\"crossed\"] for s in summaries))", "crossed = len(summaries)",
           "tests/test_failure_modes.py"),
    Mutant("the state direction is not normalised over the attractors", "fastmem/failure_modes.py",
           "/ weight.sum(dim=1, keepdim=True).clamp_min(1e-12)", "", "tests/test_failure_modes.py"),
    Mutant("a grid claim holds only where it holds at every point", "fastmem/verdicts.py",
           "    for verdict in (stats.HOLDS, stats.PARTLY):\n        if verdict in found:",
           "    for verdict in (stats.HOLDS, stats.PARTLY):\n        if found and set(found) == {verdict}:",
           "tests/test_verdicts.py"),
    Mutant("LoCoMo answers are not stemmed", "fastmem/evaluation.py",
           "return [_STEMMER.stem(word) for word in", "return [word for word in", "tests/test_scoring.py"),
    Mutant("binding gate ignores whether the context is present", "fastmem/binding/selection.py",
           "return (context_score < self.context_threshold) | (word_score < self.word_threshold)",
           "return word_score < self.word_threshold", "tests/test_binding.py"),
    Mutant("binding gate ignores whether the word is present", "fastmem/binding/selection.py",
           "return (context_score < self.context_threshold) | (word_score < self.word_threshold)",
           "return context_score < self.context_threshold", "tests/test_binding.py"),
    Mutant("binding similarity threshold removed", "fastmem/binding/selection.py",
           "miss = best < threshold if threshold is not None else", "miss = ", "tests/test_binding.py"),
    Mutant("GRACE radii do not shrink away from conflicting entries", "fastmem/binding/selection.py",
           "return torch.maximum(torch.full_like(nearest_conflict, initial_threshold), (1 + nearest_conflict) / 2)",
           "return torch.full_like(nearest_conflict, initial_threshold)", "tests/test_binding.py"),
    Mutant("whole-context key pools only the context's last token", "fastmem/binding/memory.py",
           "begin = end - 1 if first is None else _prefix_length(tokenizer, full, prompt, first)",
           "begin = end - 1", "tests/test_binding.py"),
    Mutant("the gate keeps each prompt's first token", "fastmem/binding/selection.py",
           "    token_mask = after_first_token(token_mask)\n", "", "tests/test_binding.py"),
    Mutant("a key threshold on the trade-off curve keeps the memory's answer below it",
           "fastmem/binding/replication.py",
           'answered = np.where(group["cosine"] >= threshold, group["with_memory"], group["without"])',
           'answered = group["with_memory"].to_numpy()', "tests/test_binding.py"),
    Mutant("served binding memory ignores its gate", "fastmem/binding/serving.py",
           "miss = miss | self.gate.closed(context_score, word_score)",
           "miss = miss", "tests/test_binding.py"),
    Mutant("served latent adapter never writes", "fastmem/latent/serving.py",
           "self.banks[stream] = self.adapter.write(self.banks[stream], states[start:start + self.turn_tokens])",
           "pass", "tests/test_latent.py"),
    Mutant("served latent adapter never reads", "fastmem/latent/serving.py",
           "changed = hidden + self.adapter.residual(hidden, bank.to(hidden.dtype)).to(hidden.dtype)",
           "changed = hidden", "tests/test_latent.py"),
    Mutant("a comparison holds without its paired test", "fastmem/verdicts.py",
           'if not _number(spec["p"], glued) < float(spec.get("alpha", 0.05)):', "if False:",
           "tests/test_verdicts.py"),
    Mutant("an underpowered test decides", "fastmem/verdicts.py",
           "if not math.isfinite(detectable) or detectable > size:", "if False:", "tests/test_verdicts.py"),
    Mutant("the engine ignores a failed positive control", "fastmem/verdicts.py",
           'verdict = stats.verdict_with_control(verdict, bool(_value(spec["control"], glued)), demotes)', "pass",
           "tests/test_verdicts.py"),
    Mutant("a collapsed method gets a verdict anyway", "fastmem/verdicts.py",
           'if "collapsed" in spec and _value(spec["collapsed"], glued):', "if False:", "tests/test_verdicts.py"),
    Mutant("a registered rule is rewritten without a deviation", "fastmem/verdicts.py",
           "if later[:len(first)] != first:", "if False:", "tests/test_verdicts.py"),
    Mutant("windows that share state are resampled one by one", "fastmem/stats.py",
           "bootstrap = MovingBlockBootstrap(block_length, plain, other, seed=np.random.default_rng(seed))",
           "bootstrap = MovingBlockBootstrap(1, plain, other, seed=np.random.default_rng(seed))",
           "tests/test_stats.py"),
    Mutant("fixed seeds are resampled anyway", "fastmem/stats.py",
           "cluster_count = (np.ones((n_boot, n_clusters), dtype=int) if fixed_clusters else",
           "cluster_count = (np.ones((n_boot, n_clusters), dtype=int) if False else",
           "tests/test_stats.py"),
)


def apply(mutant: Mutant, root: Path) -> None:
    """Write ``mutant`` into the copy at ``root``; the original line must occur exactly once."""
    source = root / mutant.path
    text = source.read_text()
    found = text.count(mutant.original)
    if found != 1:
        raise ValueError(f"mutant {mutant.name!r}: its line occurs {found} times in {mutant.path}")
    source.write_text(text.replace(mutant.original, mutant.mutated))


def tests_pass(tests: list[str], mutant: Mutant | None = None) -> bool:
    """Do ``tests`` pass in a fresh copy of the tracked tree, with ``mutant`` applied if given?"""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder)
        tracked = subprocess.run(["git", "ls-files", "fastmem", "tests", "data", "notebooks", "params", "plans",
                                  "pyproject.toml"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        for name in tracked:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
        # The chapters `make test` executed with params/ci: the tests that read them reuse them
        # instead of running a chapter for every cut (the cuts guard unit tests, not these).
        if CI_BUILD.is_dir():
            shutil.copytree(CI_BUILD, copy / CI_BUILD.relative_to(ROOT))
        if mutant is not None:
            apply(mutant, copy)
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=copy, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"})
        return result.returncode == 0


def main() -> int:
    # A mutant counts as caught only if the same tests pass without it.
    if not tests_pass(sorted({m.tests for m in MUTANTS})):
        print("the guarding tests fail without any mutant: fix them first")
        return 1
    survivors = []
    for mutant in MUTANTS:
        caught = not tests_pass([mutant.tests], mutant)
        print(f"{'caught  ' if caught else 'SURVIVED'}  {mutant.name}", flush=True)
        if not caught:
            survivors.append(mutant.name)
    print(f"{len(MUTANTS) - len(survivors)} of {len(MUTANTS)} mutants caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
