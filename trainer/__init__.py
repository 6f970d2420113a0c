"""trainer/"""
