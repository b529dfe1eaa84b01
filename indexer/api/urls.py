from __future__ import annotations

from django.urls import path

from indexer.api import views

urlpatterns = [
    path("chains", views.ChainList.as_view(), name="indexer-chains"),
    path("chains/<slug:slug>/status", views.ChainStatusView.as_view(), name="indexer-chain-status"),
    path("chains/<slug:slug>/blocks", views.BlockList.as_view(), name="indexer-chain-blocks"),
    path("chains/<slug:slug>/txs", views.TransactionList.as_view(), name="indexer-chain-txs"),
    path("chains/<slug:slug>/events", views.EventList.as_view(), name="indexer-chain-events"),
    path("chains/<slug:slug>/enrichments", views.EnrichmentList.as_view(), name="indexer-chain-enrichments"),
    path(
        "chains/<slug:slug>/enrichments/requeue",
        views.EnrichmentRequeue.as_view(),
        name="indexer-chain-enrichments-requeue",
    ),
    path("chains/<slug:slug>/pause", views.ChainPause.as_view(), name="indexer-chain-pause"),
    path("chains/<slug:slug>/resume", views.ChainResume.as_view(), name="indexer-chain-resume"),
    path(
        "chains/<slug:slug>/retry-poison", views.ChainRetryPoison.as_view(), name="indexer-chain-retry-poison"
    ),
    path("chains/<slug:slug>/rollback", views.ChainRollback.as_view(), name="indexer-chain-rollback"),
]
