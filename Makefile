# Two commands for a fresh machine: `make demo` and `make test` (README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-fast lint bench clean pusa-mini

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU wheel; then deepspeed without build isolation so its
	# source build reuses this torch instead of downloading a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/pusa-ray generate --task i2v --prompt "a red circle moves right" \
		--image pusa_ray/mini/examples/red-circle-right.png --out out/demo.mp4
	@echo "wrote out/demo.mp4"

# The studio page's tests drive Debian's headless Chromium (tests/test_studio.py): installed here
# when missing and this runs as root, else the tests say what to install.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q; apt-get install -y -q --no-install-recommends chromium chromium-driver; \
		else echo "note: the page tests need chromium and chromium-driver (apt-get install as root)"; fi; \
	fi

test: $(STAMP) browser
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not s3 and not browser and not slow"

# Trains pusa-mini from scratch with our own jobs (about 1.5 h on 2 CPUs; resumable: rerun to continue)
# and copies the result into pusa_ray/weights/pusa-mini. Not needed by `make demo` or `make test`.
pusa-mini: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python jobs/pusa_mini.py

lint: $(STAMP)
	$(BIN)/ruff check pusa_ray jobs serve tests bench
	$(BIN)/ruff format --check pusa_ray jobs serve tests bench

bench: $(STAMP)
	$(BIN)/python bench/sampler.py

clean:
	rm -rf $(VENV) out
