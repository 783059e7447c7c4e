# Every target creates .venv on a fresh machine first. torch==2.13.0 is pinned to its CPU build (a bare `torch`
# pulls a CUDA build of several GB); set TORCH=torch to take the default build instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv test test-all lint demo data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,export]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(PY) -m pytest -q

test-all: venv lint
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The main job on the default data (Fashion-MNIST), with a budget that binds on any machine: the latency of
# torchvision's x0.5 shape, exported and measured now in ONNX Runtime (the CPU's default runtime).
DEMO_TARGET ?= shufflenet_v2_x0_5
demo: venv data
	$(PY) search.py --target-ms $(DEMO_TARGET) --device cpu --preset quick

# Fashion-MNIST comes from Debian's package (installed here when run as root); search.py says where it looked if not.
data:
	@test -d /usr/share/datasets/fashion-mnist || { [ "$$(id -u)" = 0 ] && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
		echo "note: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) for the default data"
