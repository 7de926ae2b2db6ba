//go:build !k8spre34

package main

import (
	"context"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	draplugin "k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

// Kubernetes 1.34+: dra.Manager with its DRAPluginManager and the health stream.
type newDRA struct{ m *dra.Manager }

func newManager(ctx context.Context, k *kubelet) (manager, error) {
	m, err := dra.NewManager(klog.Background(), k.client, k.state)
	if err != nil {
		return nil, err
	}
	if err := m.Start(ctx, k.activePods, k.getNode, allReady{}); err != nil {
		return nil, err
	}
	return &newDRA{m}, nil
}

func (d *newDRA) handler() cache.PluginHandler { return d.m.GetWatcherHandler() }

func (d *newDRA) registered(driver string) error {
	_, err := d.m.GetWatcherHandler().(*draplugin.DRAPluginManager).GetPlugin(driver)
	return err
}

func (d *newDRA) PrepareResources(ctx context.Context, pod *v1.Pod) error {
	return d.m.PrepareResources(ctx, pod)
}

func (d *newDRA) UnprepareResources(ctx context.Context, pod *v1.Pod) error {
	return d.m.UnprepareResources(ctx, pod)
}

func (d *newDRA) cdiDevices(pod *v1.Pod) ([]string, error) {
	info, err := d.m.GetResources(pod, &pod.Spec.Containers[0])
	if err != nil {
		return nil, err
	}
	var names []string
	for _, c := range info.CDIDevices {
		names = append(names, c.Name)
	}
	return names, nil
}

func (d *newDRA) health(pod *v1.Pod) (map[string]string, <-chan struct{}, error) {
	status := v1.PodStatus{ContainerStatuses: []v1.ContainerStatus{{Name: "main"}}}
	d.m.UpdateAllocatedResourcesStatus(klog.Background(), pod, &status)
	health := map[string]string{}
	for _, rs := range status.ContainerStatuses[0].AllocatedResourcesStatus {
		for _, r := range rs.Resources {
			health[string(r.ResourceID)] = string(r.Health)
		}
	}
	woken := make(chan struct{})
	go func() {
		select {
		case <-d.m.Updates():
		case <-woken:
			return
		}
		close(woken)
	}()
	return health, woken, nil
}

func (d *newDRA) stop() { d.m.Stop() }

func runPluginManager(ctx context.Context, pm pluginmanager.PluginManager) {
	pm.Run(ctx, allReady{}, ctx.Done())
}
