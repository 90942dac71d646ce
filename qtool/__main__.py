from qtool.cli import run

run()
