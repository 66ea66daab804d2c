PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
