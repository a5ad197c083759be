# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vqtok-installed
DEMO := demo-out
# The shipped model `make demo` tokenizes with (`vqtok models` lists them); its sample is samples/heldout/NAME.
DEMO_MODEL := photos

.PHONY: install demo models test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,speech]'
	touch $(STAMP)

# A shipped model at work on real held-out files (encode, decode, codebook usage, quality), then a small
# tokenizer trained on the bundled MNIST sample.
demo: install
	rm -rf $(DEMO)
	$(BIN)/vqtok models
	$(BIN)/vqtok encode $(DEMO_MODEL) samples/heldout/$(DEMO_MODEL) --out $(DEMO)/tokens
	$(BIN)/vqtok decode $(DEMO_MODEL) $(DEMO)/tokens --out $(DEMO)/recon
	$(BIN)/vqtok inspect $(DEMO)/tokens --plot $(DEMO)/usage.png
	$(BIN)/vqtok eval $(DEMO_MODEL) samples/heldout/$(DEMO_MODEL) --plot $(DEMO)/eval.png
	$(BIN)/vqtok train samples/images --out $(DEMO)/run --steps 300 --batch-size 64 --checkpoint-every 100
	@echo
	@echo "$(DEMO_MODEL): samples/heldout/$(DEMO_MODEL) -> $(DEMO)/tokens -> $(DEMO)/recon; $(DEMO)/eval.png (inputs above, reconstructions below), $(DEMO)/usage.png"
	@echo "your own model: $(DEMO)/run/model.safetensors, previews in $(DEMO)/run/previews/"

# Retrain every shipped model from ../shared/data and rewrite its card (minutes for mnist and cifar10, hours for
# photos and speech; one model: .venv/bin/python tools/build_models.py NAME). One thread unless set otherwise:
# the cards' trainings ran so, on a CPU other jobs shared.
models: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python tools/build_models.py

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
