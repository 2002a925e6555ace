"""cotune.memory"""
