# Skillbook: `make demo` runs the main job, `make test` runs what CI runs.
# Both create .venv on first use (torch 2.13.0 CPU first, then the project) and are fast afterwards.

VENV    ?= .venv
PY      := $(VENV)/bin/python
SKILLS  := $(VENV)/bin/skills
EXTRAS  ?= train,serve,export,dev
# llama.cpp builds portable x86-64 AVX2 code instead of -march=native, so a cached wheel runs on any recent CPU.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
WHEELS  ?= $(HOME)/.cache/skillbook/wheels
STAMP   := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | tr ',' '-')

.PHONY: setup browser test check demo lint schema site clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	@# llama-cpp-python ships only as source: compile it once (~12 min on 2 cores) into a wheelhouse, reuse after.
	@ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || $(PY) -m pip wheel -q --no-deps -w $(WHEELS) 'llama-cpp-python>=0.3'
	$(PY) -m pip install -q --prefer-binary --find-links $(WHEELS) -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

lint: setup
	$(SKILLS) lint

# Headless Chromium for the docs-site browser test (Debian package; skipped with a reason if it cannot install).
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium unavailable: the browser test will say so"; }

test: setup browser
	$(SKILLS) lint
	$(PY) -m pytest -q

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
