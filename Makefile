PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test docs clean

$(BIN)/modbal: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[all,test]'
	touch $(BIN)/modbal

install: $(BIN)/modbal

demo: install
	$(BIN)/modbal demo

test: install
	$(BIN)/python -m pytest

docs: install
	$(BIN)/python tools/gen_api.py

clean:
	rm -rf $(VENV) runs .pytest_cache
