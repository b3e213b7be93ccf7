# Skillbook: `make demo` runs the main job, `make test` runs what CI runs.
# Both create .venv on first use (torch 2.13.0 CPU first, then the project) and are fast afterwards.

VENV    ?= .venv
PY      := $(VENV)/bin/python
SKILLS  := $(VENV)/bin/skills
EXTRAS  ?= train,serve,export,dev
# Every direct and indirect dependency at the version CI last passed with; `make lock` refreshes it.
LOCK    := requirements.lock
# llama.cpp builds portable x86-64 AVX2 code instead of -march=native, so a cached wheel runs on any recent
# CPU; LLAVA_BUILD=OFF skips the multimodal library (51 of 178 objects), which nothing here loads.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF
WHEELS  ?= $(HOME)/.cache/skillbook/wheels
# pytest-xdist workers for `make test`: each gets cores / workers threads and its own test files; one builds
# each shared session fixture (tests/conftest.py). Tiny-model tests are mostly one-core Python: on a 2-core
# Zen 3, 2 workers took the suite from 3513 s to 1481 s and the bf16 pass from 584 s to 132 s.
# TEST_JOBS=0 runs it in one process.
TEST_JOBS ?= 2
XDIST   := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)
STAMP   := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | tr ',' '-')
LLAMA_V := $(shell sed -n 's/^llama[-_]cpp[-_]python==//p' $(LOCK))
BUILD   := $(VENV)/llama-build
# The llama-cpp-python sdist, downloaded once: the wheel compiles from it and llama.cpp's own HF -> GGUF
# converter (convert_hf_to_gguf.py, conversion/, gguf-py/) is extracted from it, so both are the same llama.cpp.
SDIST   := $(WHEELS)/llama_cpp_python-$(LLAMA_V).tar.gz
CONVERT := $(VENV)/llama.cpp-convert

.PHONY: setup browser test check code demo lint schema site clean lock support

setup: $(STAMP) $(CONVERT)/convert_hf_to_gguf.py

# llama-cpp-python ships only as source. Its compile (~6 min on 2 cores) starts first, in the background,
# into a wheelhouse that later set-ups reuse; the locked packages download and install meanwhile.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	@mkdir -p $(WHEELS) && rm -f $(BUILD).rc
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_V)-*.whl >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory $(SDIST) && \
	  echo "compiling llama-cpp-python $(LLAMA_V) in the background (log: $(BUILD).log)"; \
	  (python3 -m pip wheel -q --no-deps -w $(WHEELS) $(SDIST) > $(BUILD).log 2>&1; \
	   echo $$? > $(BUILD).rc) & \
	else echo 0 > $(BUILD).rc; fi
	$(PY) -m pip install -q --upgrade pip
	@# torch first and alone: named on its own it resolves to the local CPU wheel, never a CUDA build.
	$(PY) -m pip install -q $$(grep '^torch==' $(LOCK))
	grep -v -i '^llama[-_]cpp[-_]python==' $(LOCK) > $(VENV)/lock-without-llama.txt
	$(PY) -m pip install -q -r $(VENV)/lock-without-llama.txt
	@while [ ! -f $(BUILD).rc ]; do sleep 2; done
	@[ "$$(cat $(BUILD).rc)" = 0 ] || { tail -40 $(BUILD).log; echo "llama-cpp-python failed to compile"; exit 1; }
	$(PY) -m pip install -q --no-deps --no-index --find-links $(WHEELS) 'llama-cpp-python==$(LLAMA_V)'
	@# the project itself; -c keeps every package it needs at the locked version (extras outside the lock resolve)
	$(PY) -m pip install -q -c $(LOCK) --find-links $(WHEELS) -e '.[$(EXTRAS)]'
	$(PY) -m pip check
	rm -f $(VENV)/.installed-*
	touch $@

$(SDIST):
	@mkdir -p $(WHEELS)
	python3 -m pip download -q --no-deps --no-binary :all: 'llama-cpp-python==$(LLAMA_V)' -d $(WHEELS)

# llama.cpp's converter, only the files it runs (+ its MIT licence); skillbook.ml.gguf_convert finds it here.
$(CONVERT)/convert_hf_to_gguf.py: $(LOCK) | $(SDIST)
	rm -rf $(CONVERT) $(CONVERT).tmp && mkdir -p $(CONVERT).tmp
	tar -xzf $(SDIST) -C $(CONVERT).tmp --strip-components=3 \
	  $(addprefix llama_cpp_python-$(LLAMA_V)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py LICENSE)
	mv $(CONVERT).tmp $(CONVERT) && touch $@

# Re-resolve pyproject.toml's ranges to the newest releases, rewrite the lock from a fresh install, install it
# here, and record the new versions as every skill's tested-with. Then run `make test` and commit if it passes.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q torch==2.13.0
	.venv-lock/bin/python -m pip install -q --prefer-binary --find-links $(WHEELS) -e '.[$(EXTRAS)]'
	{ sed -n '1,2p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | LC_ALL=C sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
	$(MAKE) setup
	$(SKILLS) doctor --update --no-run $$(ls skills)

lint: setup
	$(SKILLS) lint

# Headless Chromium for the docs-site browser test (Debian package; skipped with a reason if it cannot install).
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium unavailable: the browser test will say so"; }

# The suite, then again the tests whose numbers depend on the autocast dtype, with bf16 forced on: a bf16-only
# failure shows on every CPU, including AVX2-only ones where `dtype: auto` never picks bf16.
# The family-matrix tests record their cells in build/family-matrix.json; the published support table
# (tests/support/family-matrix.json, shown in README.md and on the site) must agree with them.
test: setup browser code
	$(SKILLS) lint
	rm -f build/family-matrix.json
	SKILLBOOK_SUPPORT_OUT=build/family-matrix.json $(PY) -m pytest -q --durations=30 $(XDIST)
	$(SKILLS) support --check build/family-matrix.json
	SKILLBOOK_AUTO_DTYPE=bfloat16 $(PY) -m pytest -q -m autocast $(XDIST)

# Re-measure the skill x model-family table and write it into README.md (commit both).
support: setup
	rm -f tests/support/family-matrix.json
	SKILLBOOK_SUPPORT_OUT=tests/support/family-matrix.json $(PY) -m pytest -q -m family_matrix
	$(SKILLS) support --write

# The code itself: ruff's lint rules and formatting, and mypy (configured in pyproject.toml).
code: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Exactly what CI runs.
check: test

demo: setup
	$(SKILLS) run speedrun

schema: setup
	$(SKILLS) schema

site: setup
	$(SKILLS) site build

clean:
	rm -rf $(VENV) build .pytest_cache
