# Two commands on a fresh machine:  `make demo`  and  `make test`.
# torch is installed first and pinned through constraints.txt, so no later install
# can swap it for a multi-GB CUDA build. On a GPU machine use your own build:
#   make install TORCH="torch"   (or install torch yourself before `make install`)

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lathe-installed

WHEELHOUSE ?= dist/wheelhouse
EXTRAS     ?= deepspeed,qlora,modelscope,tensorboard
PIP_EXTRA  ?=

.PHONY: install install-runtime wheelhouse install-offline demo test clean browser

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,deepspeed]"
	@# DeepSpeed compiles its CPU Adam (ZeRO offload) at its first use, a minute or two: done once here
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('CPUAdamBuilder').load()" \
	  >/dev/null 2>&1 || echo "DeepSpeed's CPU Adam did not build now; ZeRO offload builds it at its first run"
	touch $(STAMP)

# Lathe and its extras without the test tools (the Docker images run this).
install-runtime:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_EXTRA) "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt ".[$(EXTRAS)]"

# On a machine that can reach PyPI: every wheel Lathe and EXTRAS need, torch's build named, into
# WHEELHOUSE (same OS, CPU and Python as the closed machine; tools/offline.py --platform for another).
wheelhouse: install
	$(BIN)/python tools/offline.py wheelhouse --to $(WHEELHOUSE) --torch "$(TORCH)" --extras "$(EXTRAS)"

# On the closed machine: the venv from WHEELHOUSE alone (pip --no-index); a missing wheel is named.
install-offline:
	$(PYTHON) tools/offline.py install --from $(WHEELHOUSE) --venv $(VENV)
	touch $(STAMP)

demo: install
	$(BIN)/lathe demo

test: install browser
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/python -m pytest -q -n auto --maxschedchunk 1 --durations=25

# The web UI's tests drive a real browser: Debian's Chromium and a font with Chinese glyphs, installed
# here when missing and apt can run (as root); elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 && fc-list :lang=zh 2>/dev/null | grep -q . || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q chromium fonts-wqy-microhei >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium fonts-wqy-microhei >/dev/null 2>&1; }; } || \
	  echo "No Chromium here (apt-get install chromium): the web UI's browser tests will skip."; }

clean:
	rm -rf $(VENV) runs .pytest_cache
