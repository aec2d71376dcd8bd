# mg3d — two commands: `make demo` (the main job on synthetic data) and `make test`.
# Both create .venv if missing and install the project from the exact lock (requirements/lock.txt).
# The install is stamped: a second run installs nothing and goes straight to the work.
# qwen-agent is installed apart, with --no-deps at its locked pin: the tests use only its qwen.tiktoken data file
# (mg3d.testing.qwen_folder), not the agent framework its dependencies would bring.

PYTHON ?= python3
# UTF-8 text I/O whatever the machine's locale (CI may run with LANG unset, i.e. ASCII).
export PYTHONUTF8 := 1
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mg3d-installed

.PHONY: install demo demo-2d demo-pretrain test lint format clean-venv

$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing mg3d and its locked dependencies into $(VENV) (first run only, ~2-3 min)..."
	@$(PY) -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[dev]' 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c requirements/lock.txt qwen-agent 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import mg3d, torch, monai, transformers, trl, torchio, lightning, tiktoken; \
		from mg3d.testing import qwen_ranks_path; qwen_ranks_path()" \
		|| { echo "mg3d install failed: see the pip output above"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# The main job on synthetic data: phantoms written on first use, warm start, GRPO, before/after table.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) scripts/train.py fit --config configs/demo.yaml

# Re-make the pretrained policy `make demo` starts from (pretrained/ct3d_body_tiny; about 30 min on 2 cores):
# supervised steps on phantoms drawn with another seed than the demo's, then the policy saved as a model folder.
demo-pretrain: $(STAMP)
	rm -rf runs/demo_pretrain/checkpoints
	OMP_NUM_THREADS=2 $(PY) scripts/train.py fit --config configs/demo_pretrain.yaml
	$(PY) scripts/save_policy.py --ckpt runs/demo_pretrain/checkpoints/last.ckpt --out pretrained/ct3d_body_tiny \
		--made-by "make demo-pretrain (scripts/train.py fit --config configs/demo_pretrain.yaml)"

# The same recipe on synthetic chest radiographs (ChestX-ray8 layout, 2D boxes).
demo-2d: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) scripts/train.py fit --config configs/demo_2d.yaml

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
