"""cotune.runtime"""
