# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vqtok-installed
DEMO := demo-out

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Train on the bundled MNIST sample, encode it, decode it back, and report codebook usage.
demo: install
	rm -rf $(DEMO)
	$(BIN)/vqtok train samples/images --out $(DEMO)/run --steps 600 --batch-size 64 --checkpoint-every 200
	$(BIN)/vqtok encode $(DEMO)/run/model.safetensors samples/images --out $(DEMO)/tokens
	$(BIN)/vqtok decode $(DEMO)/run/model.safetensors $(DEMO)/tokens --out $(DEMO)/recon
	$(BIN)/vqtok inspect $(DEMO)/tokens --plot $(DEMO)/usage.png
	@echo
	@echo "pictures: $(DEMO)/run/previews/ (inputs above, reconstructions below), $(DEMO)/recon/, $(DEMO)/usage.png"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
