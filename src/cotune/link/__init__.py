"""cotune.link"""
