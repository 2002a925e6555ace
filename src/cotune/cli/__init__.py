"""cotune.cli"""
